// Bit-packed binary convolution and linear layers: XNOR/popcount kernels.
//
// A +-1 vector is stored as bits (1 <=> +1), 64 per uint64 word. For two such vectors of length
// n, dot = n - 2 * popcount(a XOR b). Channels are packed per pixel ([B, H, W, ceil(C/64)] words,
// unused high bits 0 in both operands, so they add nothing to the XOR) and the kernel walks the
// taps of the window directly on the packed input (no im2col copy); taps that fall into the zero
// padding are skipped, which is exactly what a zero contributes to the float convolution.
// A linear layer is the 1x1 case on a 1x1 image.
//
// Three implementations of the inner loop, chosen at run time: AVX-512 VPOPCNTDQ (8 filters per
// instruction), AVX2 (4 filters, popcount by nibble lookup), and portable scalar code.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <vector>

namespace {

enum Impl : int64_t { SCALAR = 0, AVX2 = 1, AVX512 = 2 };

struct Geometry {
  int64_t B, H, W, words, C, O, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
};

// Accumulates sum over the valid taps and words of popcount(x ^ w) for filters [o0, o0 + n).
// w is laid out [kh * kw * words, O]: for one (tap, word) the O filters are contiguous.
template <int64_t kImpl>
void accumulate(const uint64_t* x_pixel_base, const uint64_t* w, const Geometry& g, int64_t b, int64_t oh,
                int64_t ow, int64_t o0, int64_t n, int64_t* acc, int64_t* valid);

inline bool tap_pixel(const Geometry& g, int64_t oh, int64_t ow, int64_t ki, int64_t kj, int64_t* ih, int64_t* iw) {
  *ih = oh * g.sh - g.ph + ki * g.dh;
  *iw = ow * g.sw - g.pw + kj * g.dw;
  return *ih >= 0 && *ih < g.H && *iw >= 0 && *iw < g.W;
}

template <>
void accumulate<SCALAR>(const uint64_t* x, const uint64_t* w, const Geometry& g, int64_t b, int64_t oh, int64_t ow,
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

template <>
__attribute__((target("avx2"))) void accumulate<AVX2>(const uint64_t* x, const uint64_t* w, const Geometry& g,
                                                      int64_t b, int64_t oh, int64_t ow, int64_t o0, int64_t n,
                                                      int64_t* acc, int64_t* valid) {
  // n == 16: four registers of 4 filters each.
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

template <>
__attribute__((target("avx512f,avx512vpopcntdq"))) void accumulate<AVX512>(
    const uint64_t* x, const uint64_t* w, const Geometry& g, int64_t b, int64_t oh, int64_t ow, int64_t o0, int64_t n,
    int64_t* acc, int64_t* valid) {
  // n == 32: four registers of 8 filters each.
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

constexpr int64_t block_of(int64_t impl) { return impl == AVX512 ? 32 : impl == AVX2 ? 16 : 64; }

template <int64_t kImpl>
void run(const uint64_t* x, const uint64_t* w, const Geometry& g, int32_t* out) {
  constexpr int64_t block = block_of(kImpl);
  at::parallel_for(0, g.B * g.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> acc(block);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.Ho, oh = r % g.Ho;
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        int32_t* o_ptr = out + ((b * g.Ho + oh) * g.Wo + ow) * g.O;
        for (int64_t o0 = 0; o0 < g.O; o0 += block) {
          const int64_t n = std::min(block, g.O - o0);
          int64_t valid = 0;
          if (n == block)
            accumulate<kImpl>(x, w, g, b, oh, ow, o0, n, acc.data(), &valid);
          else  // the last, partial block of filters
            accumulate<SCALAR>(x, w, g, b, oh, ow, o0, n, acc.data(), &valid);
          for (int64_t i = 0; i < n; ++i) o_ptr[o0 + i] = static_cast<int32_t>(valid * g.C - 2 * acc[i]);
        }
      }
    }
  });
}

}  // namespace

// Sign bits of one pixel's C floats into words (bit c set when s[c] >= 0, -0.0 included).
void pack_pixel_scalar(const float* s, int64_t C, uint64_t* d) {
  for (int64_t c = 0; c < C; ++c)
    if (s[c] >= 0.f) d[c >> 6] |= (uint64_t{1} << (c & 63));
}

__attribute__((target("avx512f"))) void pack_pixel_avx512(const float* s, int64_t C, uint64_t* d) {
  const __m512 zero = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {  // one compare gives 16 sign bits
    const uint64_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + c), zero, _CMP_GE_OQ);
    d[c >> 6] |= m << (c & 63);
  }
  for (; c < C; ++c)
    if (s[c] >= 0.f) d[c >> 6] |= (uint64_t{1} << (c & 63));
}

__attribute__((target("avx2"))) void pack_pixel_avx2(const float* s, int64_t C, uint64_t* d) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const uint64_t m = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + c), zero, _CMP_GE_OQ)));
    d[c >> 6] |= m << (c & 63);
  }
  for (; c < C; ++c)
    if (s[c] >= 0.f) d[c >> 6] |= (uint64_t{1} << (c & 63));
}

int64_t best_impl() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq")) return AVX512;
  if (__builtin_cpu_supports("avx2")) return AVX2;
  return SCALAR;
}

// x: float [B, C, H, W] (any memory format) -> int64 [B, H, W, ceil(C / 64)], bit c of a pixel's
// words set when x[b, c, h, w] >= 0 (sign(0) = +1); bits past C stay 0.
torch::Tensor pack_channels(torch::Tensor x, int64_t impl) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat, "pack_channels: expects a float [B, C, H, W] tensor");
  auto nhwc = x.permute({0, 2, 3, 1}).contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), words = (C + 63) / 64;
  auto out = torch::zeros({B, H, W, words}, torch::kLong);
  const float* src = nhwc.data_ptr<float>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  auto pack = impl == AVX512 ? pack_pixel_avx512 : impl == AVX2 ? pack_pixel_avx2 : pack_pixel_scalar;
  at::parallel_for(0, B * H * W, 256, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) pack(src + p * C, C, dst + p * words);
  });
  return out;
}

// x_bits [B, H, W, words] from pack_channels; w_bits [kh * kw * words, O] (pack_weight in Python);
// returns int32 [B, Ho, Wo, O]: the exact +-1 convolution sum_taps (C - 2 popcount(x ^ w)).
torch::Tensor binary_conv(torch::Tensor x_bits, torch::Tensor w_bits, int64_t C, int64_t kh, int64_t kw,
                          int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t impl) {
  TORCH_CHECK(x_bits.dim() == 4 && x_bits.scalar_type() == torch::kLong && x_bits.is_contiguous(),
              "binary_conv: x_bits must be a contiguous int64 [B, H, W, words] tensor");
  TORCH_CHECK(w_bits.dim() == 2 && w_bits.scalar_type() == torch::kLong && w_bits.is_contiguous(),
              "binary_conv: w_bits must be a contiguous int64 [kh * kw * words, O] tensor");
  Geometry g{x_bits.size(0), x_bits.size(1), x_bits.size(2), x_bits.size(3), C, w_bits.size(1),
             kh, kw, sh, sw, ph, pw, dh, dw, 0, 0};
  TORCH_CHECK(w_bits.size(0) == kh * kw * g.words, "binary_conv: weight words do not match the input's");
  g.Ho = (g.H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  g.Wo = (g.W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  auto out = torch::empty({g.B, g.Ho, g.Wo, g.O}, torch::kInt);
  const uint64_t* x = reinterpret_cast<const uint64_t*>(x_bits.data_ptr<int64_t>());
  const uint64_t* w = reinterpret_cast<const uint64_t*>(w_bits.data_ptr<int64_t>());
  int32_t* o = out.data_ptr<int32_t>();
  if (impl == AVX512) run<AVX512>(x, w, g, o);
  else if (impl == AVX2) run<AVX2>(x, w, g, o);
  else run<SCALAR>(x, w, g, o);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("best_impl", &best_impl, "fastest implementation this CPU supports: 2 avx512, 1 avx2, 0 scalar");
  m.def("pack_channels", &pack_channels, "pack the signs of a float [B, C, H, W] tensor into int64 words");
  m.def("binary_conv", &binary_conv, "XNOR/popcount convolution of packed operands -> int32");
}
