// Bit-packed binary convolution and linear layers: XNOR/popcount kernels with a fused epilogue.
//
// A +-1 vector is stored as bits (1 <=> +1), 64 per uint64 word. For two such vectors of length
// n, dot = n - 2 * popcount(a XOR b). Channels are packed per pixel ([B, H, W, ceil(C/64)] words,
// unused high bits 0 in both operands, so they add nothing to the XOR) and the kernel walks the
// taps of the window directly on the packed input (no im2col copy); taps that fall into the zero
// padding are skipped, which is exactly what a zero contributes to the float convolution.
// A linear layer is the 1x1 case on a 1x1 image.
//
// Three implementations of the inner loop, chosen at run time: AVX-512 VPOPCNTDQ (8 filters per
// instruction; 4 neighbouring output pixels share each weight load where no tap needs padding),
// AVX2 (4 filters, popcount by nibble lookup), and portable scalar code.
//
// Epilogue, per output pixel once all its filters are summed (the integer P never leaves the
// cache): either the folded integer thresholds of a BatchNorm -> sign pair,
//   bit_o = s_o * P_o >= tau_o                    (FINN, Umuroglu et al. 2017, sec. 4.2.2),
// or the float tail of the layer and what follows it, in the order and fp32 roundings of the
// torch modules it replaces (this file is compiled with -ffp-contract=off, so the only fused
// multiply-add is BatchNorm's, which torch's eval-mode kernel computes as one fma(v, a, c)),
//   v = fma(((P * alpha_o) * K) + b_o, bn_a_o, bn_c_o) + residual;  v = act(v)
// written as fp32 (NCHW or NHWC strides) and/or as the sign bits of v >= t_o for the next layer.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

enum Impl : int64_t { SCALAR = 0, AVX2 = 1, AVX512 = 2 };
enum Act : int64_t { ACT_NONE = 0, ACT_CLAMP = 1, ACT_SHIFTED_PRELU = 2 };
const char* kImplNames[] = {"scalar", "avx2", "avx512"};

struct Geometry {
  int64_t B, H, W, words, C, O, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
};

// What happens to a pixel's O sums; null pointers are absent steps.
struct Epilogue {
  const int32_t* fold_sign = nullptr;  // [O] +-1, with fold_tau: bits only, no float
  const int32_t* fold_tau = nullptr;
  const float* scale = nullptr;        // [O] alpha
  const float* pixel_scale = nullptr;  // [B * Ho * Wo] XNOR-Net's K
  const float* bias = nullptr;         // [O]
  const float* bn_mul = nullptr;       // [O], with bn_add: v = fma(v, bn_mul, bn_add)
  const float* bn_add = nullptr;       // [O]
  const float* residual = nullptr;     // element (b, o, h, w) at b*r[0] + o*r[1] + h*r[2] + w*r[3]
  int64_t r[4] = {0, 0, 0, 0};
  int64_t act = ACT_NONE;
  float lo = 0.f, hi = 0.f;            // ACT_CLAMP
  const float* act_in = nullptr;       // ACT_SHIFTED_PRELU: v - act_in, PReLU slope, + act_out ([O] each)
  const float* act_slope = nullptr;
  const float* act_out = nullptr;
  float* real = nullptr;               // element (b, o, h, w) at b*y[0] + o*y[1] + h*y[2] + w*y[3]
  int64_t y[4] = {0, 0, 0, 0};
  const float* threshold = nullptr;    // [O]: bit o = v_o >= threshold_o (sign(v - t), sign(0) = +1)
  uint64_t* bits = nullptr;            // [B * Ho * Wo, out_words]
  int64_t out_words = 0;
  int32_t* raw = nullptr;              // [B * Ho * Wo, O]: P itself
  float* abs_mean = nullptr;           // [B * Ho * Wo]: mean over channels of |v|, summed as ATen does
  int64_t lanes = 16;                  // ... with vectors of this many floats
};

inline bool tap_pixel(const Geometry& g, int64_t oh, int64_t ow, int64_t ki, int64_t kj, int64_t* ih, int64_t* iw) {
  *ih = oh * g.sh - g.ph + ki * g.dh;
  *iw = ow * g.sw - g.pw + kj * g.dw;
  return *ih >= 0 && *ih < g.H && *iw >= 0 && *iw < g.W;
}

// ---- accumulation: sum over the valid taps and words of popcount(x ^ w) for filters [o0, o0 + n) ----
// w is laid out [kh * kw * words, O]: for one (tap, word) the O filters are contiguous.

void accumulate_scalar(const uint64_t* x, const uint64_t* w, const Geometry& g, int64_t b, int64_t oh, int64_t ow,
                       int64_t o0, int64_t n, int64_t* acc, int64_t* valid) {
  for (int64_t i = 0; i < n; ++i) acc[i] = 0;
  *valid = 0;
  for (int64_t ki = 0; ki < g.kh; ++ki)
    for (int64_t kj = 0; kj < g.kw; ++kj) {
      int64_t ih, iw;
      if (!tap_pixel(g, oh, ow, ki, kj, &ih, &iw)) continue;
      ++*valid;
      const uint64_t* xp = x + ((b * g.H + ih) * g.W + iw) * g.words;
      const uint64_t* wp = w + ((ki * g.kw + kj) * g.words) * g.O + o0;
      for (int64_t c = 0; c < g.words; ++c) {
        const uint64_t xv = xp[c];
        const uint64_t* wr = wp + c * g.O;
        for (int64_t i = 0; i < n; ++i) acc[i] += __builtin_popcountll(xv ^ wr[i]);
      }
    }
}

__attribute__((target("avx2"))) inline __m256i popcount_avx2(__m256i v) {
  const __m256i lookup = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                          0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_shuffle_epi8(lookup, _mm256_and_si256(v, low));
  const __m256i hi = _mm256_shuffle_epi8(lookup, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
  return _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256());  // 4 x 64-bit counts
}

// 16 filters: four registers of 4.
__attribute__((target("avx2"))) void accumulate_avx2(const uint64_t* x, const uint64_t* w, const Geometry& g,
                                                     int64_t b, int64_t oh, int64_t ow, int64_t o0, int64_t* acc,
                                                     int64_t* valid) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  *valid = 0;
  for (int64_t ki = 0; ki < g.kh; ++ki)
    for (int64_t kj = 0; kj < g.kw; ++kj) {
      int64_t ih, iw;
      if (!tap_pixel(g, oh, ow, ki, kj, &ih, &iw)) continue;
      ++*valid;
      const uint64_t* xp = x + ((b * g.H + ih) * g.W + iw) * g.words;
      const uint64_t* wp = w + ((ki * g.kw + kj) * g.words) * g.O + o0;
      for (int64_t c = 0; c < g.words; ++c) {
        const __m256i xv = _mm256_set1_epi64x(static_cast<int64_t>(xp[c]));
        const __m256i* wr = reinterpret_cast<const __m256i*>(wp + c * g.O);
        a0 = _mm256_add_epi64(a0, popcount_avx2(_mm256_xor_si256(xv, _mm256_loadu_si256(wr + 0))));
        a1 = _mm256_add_epi64(a1, popcount_avx2(_mm256_xor_si256(xv, _mm256_loadu_si256(wr + 1))));
        a2 = _mm256_add_epi64(a2, popcount_avx2(_mm256_xor_si256(xv, _mm256_loadu_si256(wr + 2))));
        a3 = _mm256_add_epi64(a3, popcount_avx2(_mm256_xor_si256(xv, _mm256_loadu_si256(wr + 3))));
      }
    }
  __m256i* out = reinterpret_cast<__m256i*>(acc);
  _mm256_storeu_si256(out + 0, a0);
  _mm256_storeu_si256(out + 1, a1);
  _mm256_storeu_si256(out + 2, a2);
  _mm256_storeu_si256(out + 3, a3);
}

// 32 filters of NP neighbouring output pixels (same row, interior: every tap valid) at once, so that
// each weight register loaded serves NP pixels.
template <int NP>
__attribute__((target("avx512f,avx512vpopcntdq"))) void accumulate_avx512_interior(
    const uint64_t* x, const uint64_t* w, const Geometry& g, int64_t b, int64_t oh, int64_t ow, int64_t o0,
    int64_t* acc /* [NP][32] */) {
  __m512i a[NP][4];
  for (int p = 0; p < NP; ++p)
    for (int q = 0; q < 4; ++q) a[p][q] = _mm512_setzero_si512();
  const int64_t pixel_step = g.sw * g.words;
  for (int64_t ki = 0; ki < g.kh; ++ki) {
    const int64_t ih = oh * g.sh - g.ph + ki * g.dh;
    for (int64_t kj = 0; kj < g.kw; ++kj) {
      const int64_t iw = ow * g.sw - g.pw + kj * g.dw;
      const uint64_t* xp = x + ((b * g.H + ih) * g.W + iw) * g.words;
      const uint64_t* wp = w + ((ki * g.kw + kj) * g.words) * g.O + o0;
      for (int64_t c = 0; c < g.words; ++c) {
        const uint64_t* wr = wp + c * g.O;
        const __m512i w0 = _mm512_loadu_si512(wr + 0), w1 = _mm512_loadu_si512(wr + 8);
        const __m512i w2 = _mm512_loadu_si512(wr + 16), w3 = _mm512_loadu_si512(wr + 24);
        for (int p = 0; p < NP; ++p) {
          const __m512i xv = _mm512_set1_epi64(static_cast<int64_t>(xp[p * pixel_step + c]));
          a[p][0] = _mm512_add_epi64(a[p][0], _mm512_popcnt_epi64(_mm512_xor_si512(xv, w0)));
          a[p][1] = _mm512_add_epi64(a[p][1], _mm512_popcnt_epi64(_mm512_xor_si512(xv, w1)));
          a[p][2] = _mm512_add_epi64(a[p][2], _mm512_popcnt_epi64(_mm512_xor_si512(xv, w2)));
          a[p][3] = _mm512_add_epi64(a[p][3], _mm512_popcnt_epi64(_mm512_xor_si512(xv, w3)));
        }
      }
    }
  }
  for (int p = 0; p < NP; ++p)
    for (int q = 0; q < 4; ++q) _mm512_storeu_si512(acc + p * 32 + q * 8, a[p][q]);
}

// 32 filters of one pixel, any tap validity.
__attribute__((target("avx512f,avx512vpopcntdq"))) void accumulate_avx512(
    const uint64_t* x, const uint64_t* w, const Geometry& g, int64_t b, int64_t oh, int64_t ow, int64_t o0,
    int64_t* acc, int64_t* valid) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  *valid = 0;
  for (int64_t ki = 0; ki < g.kh; ++ki)
    for (int64_t kj = 0; kj < g.kw; ++kj) {
      int64_t ih, iw;
      if (!tap_pixel(g, oh, ow, ki, kj, &ih, &iw)) continue;
      ++*valid;
      const uint64_t* xp = x + ((b * g.H + ih) * g.W + iw) * g.words;
      const uint64_t* wp = w + ((ki * g.kw + kj) * g.words) * g.O + o0;
      for (int64_t c = 0; c < g.words; ++c) {
        const __m512i xv = _mm512_set1_epi64(static_cast<int64_t>(xp[c]));
        const uint64_t* wr = wp + c * g.O;
        a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(_mm512_xor_si512(xv, _mm512_loadu_si512(wr + 0))));
        a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(_mm512_xor_si512(xv, _mm512_loadu_si512(wr + 8))));
        a2 = _mm512_add_epi64(a2, _mm512_popcnt_epi64(_mm512_xor_si512(xv, _mm512_loadu_si512(wr + 16))));
        a3 = _mm512_add_epi64(a3, _mm512_popcnt_epi64(_mm512_xor_si512(xv, _mm512_loadu_si512(wr + 24))));
      }
    }
  _mm512_storeu_si512(acc + 0, a0);
  _mm512_storeu_si512(acc + 8, a1);
  _mm512_storeu_si512(acc + 16, a2);
  _mm512_storeu_si512(acc + 24, a3);
}

// ---- epilogue -------------------------------------------------------------------------------------

inline float act_scalar(const Epilogue& e, float v, int64_t o) {
  if (e.act == ACT_CLAMP) return std::min(std::max(v, e.lo), e.hi);
  if (e.act == ACT_SHIFTED_PRELU) {
    const float t = v - e.act_in[o];
    return (t > 0.f ? t : e.act_slope[o] * t) + e.act_out[o];
  }
  return v;
}

// The float tail of channels [o0, o1) of one pixel, one channel at a time (v kept in vbuf if given).
void epilogue_scalar(const Epilogue& e, const int32_t* P, int64_t o0, int64_t o1, int64_t b, int64_t h,
                     int64_t w, int64_t pix, uint64_t* word_bits, float* vbuf) {
  const float k = e.pixel_scale ? e.pixel_scale[pix] : 0.f;
  for (int64_t o = o0; o < o1; ++o) {
    float v = static_cast<float>(P[o]);
    if (e.scale) v = v * e.scale[o];
    if (e.pixel_scale) v = v * k;
    if (e.bias) v = v + e.bias[o];
    if (e.bn_mul) v = std::fma(v, e.bn_mul[o], e.bn_add[o]);
    if (e.residual) v = v + e.residual[b * e.r[0] + o * e.r[1] + h * e.r[2] + w * e.r[3]];
    v = act_scalar(e, v, o);
    if (vbuf) vbuf[o] = v;
    if (e.real) e.real[b * e.y[0] + o * e.y[1] + h * e.y[2] + w * e.y[3]] = v;
    if (e.bits && v >= (e.threshold ? e.threshold[o] : 0.f)) word_bits[o >> 6] |= uint64_t{1} << (o & 63);
  }
}

__attribute__((target("avx512f"))) void epilogue_avx512(
    const Epilogue& e, const int32_t* P, int64_t O, int64_t b, int64_t h, int64_t w, int64_t pix,
    uint64_t* word_bits, float* vbuf) {
  int64_t o = 0;
  const bool res_contig = e.residual && e.r[1] == 1, real_contig = e.real && e.y[1] == 1;
  const float* res = e.residual ? e.residual + b * e.r[0] + h * e.r[2] + w * e.r[3] : nullptr;
  float* real = e.real ? e.real + b * e.y[0] + h * e.y[2] + w * e.y[3] : nullptr;
  const __m512 k = _mm512_set1_ps(e.pixel_scale ? e.pixel_scale[pix] : 0.f);
  const __m512 lo = _mm512_set1_ps(e.lo), hi = _mm512_set1_ps(e.hi), zero = _mm512_setzero_ps();
  alignas(64) float tmp[16];
  for (; o + 16 <= O; o += 16) {
    __m512 v = _mm512_cvtepi32_ps(_mm512_loadu_si512(P + o));
    if (e.scale) v = _mm512_mul_ps(v, _mm512_loadu_ps(e.scale + o));
    if (e.pixel_scale) v = _mm512_mul_ps(v, k);
    if (e.bias) v = _mm512_add_ps(v, _mm512_loadu_ps(e.bias + o));
    if (e.bn_mul) v = _mm512_fmadd_ps(v, _mm512_loadu_ps(e.bn_mul + o), _mm512_loadu_ps(e.bn_add + o));
    if (res) {
      if (res_contig) {
        v = _mm512_add_ps(v, _mm512_loadu_ps(res + o));
      } else {
        for (int i = 0; i < 16; ++i) tmp[i] = res[(o + i) * e.r[1]];
        v = _mm512_add_ps(v, _mm512_load_ps(tmp));
      }
    }
    if (e.act == ACT_CLAMP) {
      v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    } else if (e.act == ACT_SHIFTED_PRELU) {
      const __m512 t = _mm512_sub_ps(v, _mm512_loadu_ps(e.act_in + o));
      const __mmask16 pos = _mm512_cmp_ps_mask(t, zero, _CMP_GT_OQ);
      v = _mm512_mask_blend_ps(pos, _mm512_mul_ps(_mm512_loadu_ps(e.act_slope + o), t), t);
      v = _mm512_add_ps(v, _mm512_loadu_ps(e.act_out + o));
    }
    if (vbuf) _mm512_storeu_ps(vbuf + o, v);
    if (real) {
      if (real_contig) {
        _mm512_storeu_ps(real + o, v);
      } else {
        _mm512_store_ps(tmp, v);
        for (int i = 0; i < 16; ++i) real[(o + i) * e.y[1]] = tmp[i];
      }
    }
    if (e.bits) {
      const __m512 t = e.threshold ? _mm512_loadu_ps(e.threshold + o) : zero;
      const uint64_t m = _mm512_cmp_ps_mask(v, t, _CMP_GE_OQ);
      word_bits[o >> 6] |= m << (o & 63);
    }
  }
  if (o < O) epilogue_scalar(e, P, o, O, b, h, w, pix, word_bits, vbuf);
}

// sum |x[0, n)| in the order of ATen's float sum over a contiguous (inner) dimension
// (SumKernel.cpp: vectorized_inner_sum, or scalar_inner_sum when n < lanes): vectors of `lanes`
// floats go through row_sum, i.e. 4 interleaved partial sums cascaded by multi_row_sum in levels
// of 16 rows, then partials 1..3 into 0; the scalar tail is summed first and the lanes then added
// to it left to right. XNOR-Net's K = mean_c |x| needs this order to be bit-identical.
float aten_inner_sum_abs(const float* x, int64_t n, int64_t lanes) {
  const int64_t V = n < lanes ? 1 : lanes;
  const int64_t vecs = n / V, rows = vecs / 4;
  constexpr int kLevels = 4;
  int64_t ceil_log2 = 1;
  while ((int64_t{1} << ceil_log2) < rows) ++ceil_log2;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2 / kLevels);
  const int64_t level_step = int64_t{1} << level_power, level_mask = level_step - 1;
  float acc[kLevels][4][16] = {};
  auto add_vec = [&](float* dst, int64_t vec) {
    for (int64_t l = 0; l < V; ++l) dst[l] += std::fabs(x[vec * V + l]);
  };
  int64_t i = 0;
  while (i + level_step <= rows) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < 4; ++k) add_vec(acc[0][k], i * 4 + k);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < 4; ++k)
        for (int64_t l = 0; l < V; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.f;
        }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < rows; ++i)
    for (int k = 0; k < 4; ++k) add_vec(acc[0][k], i * 4 + k);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < 4; ++k)
      for (int64_t l = 0; l < V; ++l) acc[0][k][l] += acc[j][k][l];
  for (int64_t v = rows * 4; v < vecs; ++v) add_vec(acc[0][0], v);
  for (int k = 1; k < 4; ++k)
    for (int64_t l = 0; l < V; ++l) acc[0][0][l] += acc[0][k][l];
  float total = 0.f;
  for (int64_t c = vecs * V; c < n; ++c) total += std::fabs(x[c]);
  for (int64_t l = 0; l < V; ++l) total += acc[0][0][l];
  return total;
}

void fold_scalar(const Epilogue& e, const int32_t* P, int64_t o0, int64_t o1, uint64_t* word_bits) {
  for (int64_t o = o0; o < o1; ++o)
    if (e.fold_sign[o] * P[o] >= e.fold_tau[o]) word_bits[o >> 6] |= uint64_t{1} << (o & 63);
}

__attribute__((target("avx512f"))) void fold_avx512(const Epilogue& e, const int32_t* P, int64_t O,
                                                     uint64_t* word_bits) {
  int64_t o = 0;
  for (; o + 16 <= O; o += 16) {
    const __m512i v = _mm512_mullo_epi32(_mm512_loadu_si512(P + o), _mm512_loadu_si512(e.fold_sign + o));
    const uint64_t m = _mm512_cmpge_epi32_mask(v, _mm512_loadu_si512(e.fold_tau + o));
    word_bits[o >> 6] |= m << (o & 63);
  }
  if (o < O) fold_scalar(e, P, o, O, word_bits);
}

template <int64_t kImpl>
void finish_pixel(const Epilogue& e, const Geometry& g, const int32_t* P, int64_t b, int64_t oh, int64_t ow,
                  uint64_t* word_bits, float* vbuf) {
  const int64_t pix = (b * g.Ho + oh) * g.Wo + ow;
  if (e.raw) std::copy(P, P + g.O, e.raw + pix * g.O);
  if (!e.bits && !e.real && !e.abs_mean) return;
  for (int64_t i = 0; i < e.out_words; ++i) word_bits[i] = 0;
  float* keep = e.abs_mean ? vbuf : nullptr;
  if (e.fold_sign) {
    if (kImpl == AVX512) fold_avx512(e, P, g.O, word_bits);
    else fold_scalar(e, P, 0, g.O, word_bits);
  } else if (kImpl == AVX512) {
    epilogue_avx512(e, P, g.O, b, oh, ow, pix, word_bits, keep);
  } else {
    epilogue_scalar(e, P, 0, g.O, b, oh, ow, pix, word_bits, keep);
  }
  if (e.bits) std::copy(word_bits, word_bits + e.out_words, e.bits + pix * e.out_words);
  if (e.abs_mean) e.abs_mean[pix] = aten_inner_sum_abs(vbuf, g.O, e.lanes) / static_cast<float>(g.O);
}

constexpr int64_t block_of(int64_t impl) { return impl == AVX512 ? 32 : impl == AVX2 ? 16 : 64; }
constexpr int kPixels = 4;  // output pixels per AVX-512 interior step

template <int64_t kImpl>
void run(const uint64_t* x, const uint64_t* w, const Geometry& g, const Epilogue& e) {
  constexpr int64_t block = block_of(kImpl);
  // Output columns whose every tap lies inside the image (rows are checked separately).
  const int64_t ow_lo = std::min(g.Wo, (g.pw + g.sw - 1) / g.sw);
  const int64_t last = g.W + g.pw - (g.kw - 1) * g.dw - 1;  // the largest ow * sw whose window fits
  const int64_t ow_hi = last < 0 ? ow_lo : std::max(ow_lo, std::min(g.Wo, last / g.sw + 1));
  const int64_t full = g.kh * g.kw;
  at::parallel_for(0, g.B * g.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> acc(block * kPixels);
    std::vector<int32_t> P(g.O * kPixels);
    std::vector<uint64_t> word_bits(std::max<int64_t>(e.out_words, 1));
    std::vector<float> vbuf(g.O);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.Ho, oh = r % g.Ho;
      const int64_t ih0 = oh * g.sh - g.ph;
      const bool row_inside = ih0 >= 0 && ih0 + (g.kh - 1) * g.dh < g.H;
      int64_t ow = 0;
      while (ow < g.Wo) {
        int64_t np = 1;
        if (kImpl == AVX512 && row_inside && ow >= ow_lo && ow + kPixels <= ow_hi && g.O % block == 0) {
          np = kPixels;
          for (int64_t o0 = 0; o0 < g.O; o0 += block) {
            accumulate_avx512_interior<kPixels>(x, w, g, b, oh, ow, o0, acc.data());
            for (int p = 0; p < kPixels; ++p)
              for (int64_t i = 0; i < block; ++i)
                P[p * g.O + o0 + i] = static_cast<int32_t>(full * g.C - 2 * acc[p * block + i]);
          }
        } else {
          for (int64_t o0 = 0; o0 < g.O; o0 += block) {
            const int64_t n = std::min(block, g.O - o0);
            int64_t valid = 0;
            if (kImpl == AVX512 && n == block) accumulate_avx512(x, w, g, b, oh, ow, o0, acc.data(), &valid);
            else if (kImpl == AVX2 && n == block) accumulate_avx2(x, w, g, b, oh, ow, o0, acc.data(), &valid);
            else accumulate_scalar(x, w, g, b, oh, ow, o0, n, acc.data(), &valid);  // also the last, partial block
            for (int64_t i = 0; i < n; ++i) P[o0 + i] = static_cast<int32_t>(valid * g.C - 2 * acc[i]);
          }
        }
        for (int64_t p = 0; p < np; ++p) finish_pixel<kImpl>(e, g, P.data() + p * g.O, b, oh, ow + p, word_bits.data(), vbuf.data());
        ow += np;
      }
    }
  });
}

// ---- packing -------------------------------------------------------------------------------------

// Sign bits of one pixel's C floats (stride cs apart) into words: bit c set when s[c] >= 0, -0.0 included.
void pack_pixel_scalar(const float* s, int64_t C, int64_t cs, uint64_t* d) {
  for (int64_t c = 0; c < C; ++c)
    if (s[c * cs] >= 0.f) d[c >> 6] |= (uint64_t{1} << (c & 63));
}

__attribute__((target("avx512f"))) void pack_pixel_avx512(const float* s, int64_t C, int64_t cs, uint64_t* d) {
  if (cs != 1) return pack_pixel_scalar(s, C, cs, d);
  const __m512 zero = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {  // one compare gives 16 sign bits
    const uint64_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + c), zero, _CMP_GE_OQ);
    d[c >> 6] |= m << (c & 63);
  }
  for (; c < C; ++c)
    if (s[c] >= 0.f) d[c >> 6] |= (uint64_t{1} << (c & 63));
}

__attribute__((target("avx2"))) void pack_pixel_avx2(const float* s, int64_t C, int64_t cs, uint64_t* d) {
  if (cs != 1) return pack_pixel_scalar(s, C, cs, d);
  const __m256 zero = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const uint64_t m = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + c), zero, _CMP_GE_OQ)));
    d[c >> 6] |= m << (c & 63);
  }
  for (; c < C; ++c)
    if (s[c] >= 0.f) d[c >> 6] |= (uint64_t{1} << (c & 63));
}

// ---- argument checks -------------------------------------------------------------------------------

void check_impl(const char* fn, int64_t impl);

const float* optional_vector(const c10::optional<torch::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->numel() == n,
              "binary_conv: ", name, " must be a contiguous float tensor of ", n, " elements, got ", t->sizes());
  return t->data_ptr<float>();
}

}  // namespace

int64_t best_impl() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq")) return AVX512;
  if (__builtin_cpu_supports("avx2")) return AVX2;
  return SCALAR;
}

namespace {
void check_impl(const char* fn, int64_t impl) {
  TORCH_CHECK(impl >= SCALAR && impl <= AVX512, fn, ": impl=", impl, " is not one of 0 (scalar), 1 (avx2), 2 (avx512)");
  const int64_t best = best_impl();
  TORCH_CHECK(impl <= best, fn, ": impl=", impl, " (", kImplNames[impl], ") is not supported by this CPU (best: ",
              best, ", ", kImplNames[best], ")");
}
}  // namespace

// x: float [B, C, H, W] (any memory format) -> int64 [B, H, W, ceil(C / 64)], bit c of a pixel's
// words set when x[b, c, h, w] >= 0 (sign(0) = +1); bits past C stay 0.
torch::Tensor pack_channels(torch::Tensor x, int64_t impl) {
  check_impl("pack_channels", impl);
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat, "pack_channels: expects a float [B, C, H, W] tensor");
  // NCHW and NHWC are read in place; any other strides are copied to NHWC first.
  auto src_t = x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)
                   ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), words = (C + 63) / 64;
  const int64_t sb = src_t.stride(0), sc = src_t.stride(1), sh = src_t.stride(2), sw = src_t.stride(3);
  auto out = torch::zeros({B, H, W, words}, torch::kLong);
  const float* src = src_t.data_ptr<float>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  auto pack = impl == AVX512 ? pack_pixel_avx512 : impl == AVX2 ? pack_pixel_avx2 : pack_pixel_scalar;
  if (sc == 1 || C == 1) {
    at::parallel_for(0, B * H * W, 256, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / (H * W), h = (p / W) % H, w = p % W;
        pack(src + b * sb + h * sh + w * sw, C, 1, dst + p * words);
      }
    });
  } else {  // NCHW: walk runs of each channel plane contiguously, setting its bit in every pixel's words
    const int64_t HW = H * W;
    at::parallel_for(0, B * HW, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t p0 = begin; p0 < end;) {
        const int64_t b = p0 / HW, i0 = p0 % HW, n = std::min(end - p0, HW - i0);
        for (int64_t c = 0; c < C; ++c) {
          const float* plane = src + b * sb + c * sc + i0;
          uint64_t* d = dst + p0 * words + (c >> 6);
          const uint64_t bit = uint64_t{1} << (c & 63);
          for (int64_t i = 0; i < n; ++i)
            if (plane[i] >= 0.f) d[i * words] |= bit;
        }
        p0 += n;
      }
    });
  }
  return out;
}

// x_bits [B, H, W, words] from pack_channels; w_bits [kh * kw * words, O] (kernel_weight in Python).
// Returns {real, bits, raw, abs_mean}, each empty unless asked for:
//   raw  int32 [B, Ho, Wo, O]: the exact +-1 convolution sum_taps (C - 2 popcount(x ^ w)) (real_format < 0, !bits)
//   real float [B, O, Ho, Wo] in NCHW (real_format 0) or NHWC (1) memory: the epilogue's v
//   bits int64 [B, Ho, Wo, ceil(O / 64)]: v >= threshold, or s * P >= tau with fold = int32 [2, O] (s; tau)
//   abs_mean float [B, 1, Ho, Wo]: mean_o |v_o| as torch sums a channels_last tensor (abs_mean_lanes > 0:
//        the floats per vector of ATen's CPU kernels, 16 with AVX-512, 8 with AVX2)
std::vector<torch::Tensor> binary_conv_fused(
    torch::Tensor x_bits, torch::Tensor w_bits, int64_t C, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
    int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t impl,
    c10::optional<torch::Tensor> scale, c10::optional<torch::Tensor> pixel_scale, c10::optional<torch::Tensor> bias,
    c10::optional<torch::Tensor> bn_mul, c10::optional<torch::Tensor> bn_add, c10::optional<torch::Tensor> residual,
    int64_t act, c10::optional<torch::Tensor> act_params, int64_t real_format,
    c10::optional<torch::Tensor> threshold, bool bits, c10::optional<torch::Tensor> fold, int64_t abs_mean_lanes) {
  check_impl("binary_conv", impl);
  TORCH_CHECK(x_bits.dim() == 4 && x_bits.scalar_type() == torch::kLong && x_bits.is_contiguous(),
              "binary_conv: x_bits must be a contiguous int64 [B, H, W, words] tensor");
  TORCH_CHECK(w_bits.dim() == 2 && w_bits.scalar_type() == torch::kLong && w_bits.is_contiguous(),
              "binary_conv: w_bits must be a contiguous int64 [kh * kw * words, O] tensor");
  TORCH_CHECK(kh >= 1 && kw >= 1, "binary_conv: kernel size must be >= 1, got ", kh, "x", kw);
  TORCH_CHECK(sh >= 1 && sw >= 1, "binary_conv: stride must be >= 1, got ", sh, "x", sw);
  TORCH_CHECK(dh >= 1 && dw >= 1, "binary_conv: dilation must be >= 1, got ", dh, "x", dw);
  TORCH_CHECK(ph >= 0 && pw >= 0, "binary_conv: padding must be >= 0, got ", ph, "x", pw);
  TORCH_CHECK(C >= 1 && (C + 63) / 64 == x_bits.size(3), "binary_conv: channels C=", C, " need ", (C + 63) / 64,
              " words per pixel, but x_bits has ", x_bits.size(3));
  Geometry g{x_bits.size(0), x_bits.size(1), x_bits.size(2), x_bits.size(3), C, w_bits.size(1),
             kh, kw, sh, sw, ph, pw, dh, dw, 0, 0};
  TORCH_CHECK(w_bits.size(0) == kh * kw * g.words, "binary_conv: w_bits has ", w_bits.size(0),
              " rows, but a ", kh, "x", kw, " kernel over C=", C, " needs ", kh * kw * g.words);
  TORCH_CHECK(g.O >= 1, "binary_conv: w_bits has no filters");
  g.Ho = (g.H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  g.Wo = (g.W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(g.H + 2 * ph >= dh * (kh - 1) + 1 && g.W + 2 * pw >= dw * (kw - 1) + 1,
              "binary_conv: the ", g.H, "x", g.W, " input (padded by ", ph, "x", pw,
              ") is smaller than the dilated kernel");
  TORCH_CHECK(real_format >= -1 && real_format <= 1, "binary_conv: real_format must be -1, 0 or 1");
  TORCH_CHECK(act >= ACT_NONE && act <= ACT_SHIFTED_PRELU, "binary_conv: unknown act=", act);

  Epilogue e;
  const int64_t npix = g.B * g.Ho * g.Wo;
  e.scale = optional_vector(scale, g.O, "scale");
  e.pixel_scale = optional_vector(pixel_scale, npix, "pixel_scale");
  e.bias = optional_vector(bias, g.O, "bias");
  e.bn_mul = optional_vector(bn_mul, g.O, "bn_mul");
  e.bn_add = optional_vector(bn_add, g.O, "bn_add");
  TORCH_CHECK((e.bn_mul == nullptr) == (e.bn_add == nullptr), "binary_conv: bn_mul and bn_add go together");
  e.threshold = optional_vector(threshold, g.O, "threshold");
  if (residual.has_value()) {
    const auto& t = *residual;
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.dim() == 4 && t.size(0) == g.B && t.size(1) == g.O &&
                t.size(2) == g.Ho && t.size(3) == g.Wo,
                "binary_conv: residual must be a float [", g.B, ", ", g.O, ", ", g.Ho, ", ", g.Wo, "] tensor, got ",
                t.sizes());
    e.residual = t.data_ptr<float>();
    for (int i = 0; i < 4; ++i) e.r[i] = t.stride(i);
  }
  e.act = act;
  if (act != ACT_NONE) {
    TORCH_CHECK(act_params.has_value() && act_params->scalar_type() == torch::kFloat && act_params->is_contiguous(),
                "binary_conv: act=", act, " needs a contiguous float act_params tensor");
    const float* p = act_params->data_ptr<float>();
    if (act == ACT_CLAMP) {
      TORCH_CHECK(act_params->numel() == 2, "binary_conv: clamp act_params must be [lo, hi]");
      e.lo = p[0];
      e.hi = p[1];
    } else {
      TORCH_CHECK(act_params->numel() == 3 * g.O, "binary_conv: shifted-PReLU act_params must be [3, O]");
      e.act_in = p;
      e.act_slope = p + g.O;
      e.act_out = p + 2 * g.O;
    }
  }
  if (fold.has_value()) {
    TORCH_CHECK(fold->scalar_type() == torch::kInt && fold->is_contiguous() && fold->numel() == 2 * g.O,
                "binary_conv: fold must be a contiguous int32 [2, O] tensor (sign; tau)");
    TORCH_CHECK(bits && real_format < 0, "binary_conv: fold gives bits only (bits=true, real_format=-1)");
    e.fold_sign = fold->data_ptr<int32_t>();
    e.fold_tau = e.fold_sign + g.O;
  }
  torch::Tensor real_out, bits_out, raw_out;
  if (real_format == 0) {
    real_out = torch::empty({g.B, g.O, g.Ho, g.Wo}, torch::kFloat);
  } else if (real_format == 1) {
    real_out = torch::empty({g.B, g.O, g.Ho, g.Wo}, torch::TensorOptions().dtype(torch::kFloat)
                                                        .memory_format(at::MemoryFormat::ChannelsLast));
  }
  if (real_out.defined()) {
    e.real = real_out.data_ptr<float>();
    for (int i = 0; i < 4; ++i) e.y[i] = real_out.stride(i);
  }
  if (bits) {
    e.out_words = (g.O + 63) / 64;
    bits_out = torch::empty({g.B, g.Ho, g.Wo, e.out_words}, torch::kLong);
    e.bits = reinterpret_cast<uint64_t*>(bits_out.data_ptr<int64_t>());
  }
  torch::Tensor mean_out;
  if (abs_mean_lanes > 0) {
    TORCH_CHECK(abs_mean_lanes <= 16, "binary_conv: abs_mean_lanes must be at most 16");
    TORCH_CHECK(!fold.has_value(), "binary_conv: folded thresholds compute no v to average");
    mean_out = torch::empty({g.B, 1, g.Ho, g.Wo}, torch::kFloat);
    e.abs_mean = mean_out.data_ptr<float>();
    e.lanes = abs_mean_lanes;
  }
  if (!real_out.defined() && !bits && !mean_out.defined()) {
    raw_out = torch::empty({g.B, g.Ho, g.Wo, g.O}, torch::kInt);
    e.raw = raw_out.data_ptr<int32_t>();
  }
  const uint64_t* x = reinterpret_cast<const uint64_t*>(x_bits.data_ptr<int64_t>());
  const uint64_t* w = reinterpret_cast<const uint64_t*>(w_bits.data_ptr<int64_t>());
  if (impl == AVX512) run<AVX512>(x, w, g, e);
  else if (impl == AVX2) run<AVX2>(x, w, g, e);
  else run<SCALAR>(x, w, g, e);
  return {real_out, bits_out, raw_out, mean_out};
}

// The exact +-1 convolution as int32 [B, Ho, Wo, O] (binary_conv_fused without an epilogue).
torch::Tensor binary_conv(torch::Tensor x_bits, torch::Tensor w_bits, int64_t C, int64_t kh, int64_t kw,
                          int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t impl) {
  return binary_conv_fused(x_bits, w_bits, C, kh, kw, sh, sw, ph, pw, dh, dw, impl, c10::nullopt, c10::nullopt,
                           c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, ACT_NONE, c10::nullopt, -1,
                           c10::nullopt, false, c10::nullopt, 0)[2];
}

// Row sums of |x| for a float [N, n] tensor in the order of ATen's inner sum with `lanes`-float
// vectors (aten_inner_sum_abs); Python calibrates `lanes` against torch with it.
torch::Tensor inner_sum_abs(torch::Tensor x, int64_t lanes) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "inner_sum_abs: expects a float [N, n] tensor");
  TORCH_CHECK(lanes >= 1 && lanes <= 16, "inner_sum_abs: lanes must be in [1, 16]");
  auto xc = x.contiguous();
  auto out = torch::empty({x.size(0)}, torch::kFloat);
  const float* src = xc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < x.size(0); ++i) dst[i] = aten_inner_sum_abs(src + i * x.size(1), x.size(1), lanes);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("inner_sum_abs", &inner_sum_abs, "row sums of |x| in the order of ATen's contiguous float sum");
  m.def("best_impl", &best_impl, "fastest implementation this CPU supports: 2 avx512, 1 avx2, 0 scalar");
  m.def("pack_channels", &pack_channels, "pack the signs of a float [B, C, H, W] tensor into int64 words");
  m.def("binary_conv", &binary_conv, "XNOR/popcount convolution of packed operands -> int32");
  m.def("binary_conv_fused", &binary_conv_fused, "XNOR/popcount convolution with a fused epilogue -> {real, bits, raw}");
}
