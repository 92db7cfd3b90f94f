// baton's fused CPU kernels (AVX2 + FMA + F16C), float32 activations.
//
// Built by scripts/setup.sh (baton build-kernels); loaded only
// where the CPU has AVX2 (platform/native.py checks). The eager PyTorch code in
// models/ and attention.py is the fallback and the reference these are tested
// against (tests/platform/test_native_kernels.py).
//
// - Quantized linear layers: weights in group-32 blocks, as llama.cpp's Q4_1
//   (4-bit, scale and min) and Q8_0 (8-bit, scale); activations quantized per row
//   and block to int8 (Q8_1-style: scale and the block's sum), dot products on
//   AVX2's u8 x s8 multiply-add. Every output depends only on its own row and
//   column, in a fixed order, so results do not depend on the batch.
// - bf16 weights with float32 activations (weight-only: half the bytes of fp32).
// - RMSNorm, residual add + RMSNorm, rotary embedding in place, SiLU * mul.
// - Decode attention over the vector-shaped cache: each row writes its new K/V
//   at its own length and attends columns [lo, len] (per-row lengths, no mask
//   tensor), grouped-query, float32 softmax.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int QK = 32;  // quantization group

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}

inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// exp for float32 lanes (Cephes' polynomial, ~1 ulp over the range softmax and
// SiLU use; inputs below -87 give 0).
inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447504f);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  __m256 x2 = _mm256_mul_ps(x, x);
  y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline __m256 load_bf16(const uint16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return load_bf16(p); }

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(uint16_t* p, __m256 v) {  // round to nearest even, as torch's .to(bfloat16)
  __m256i u = _mm256_castps_si256(v);
  __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                  _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

void check_f32_2d(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 2 && t.stride(1) == 1,
              name, " must be a float32 CPU matrix with contiguous rows");
}

// ---------------------------------------------------------------- int8 activations

struct QuantRows {
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> d;    // [M, K/32] scale
  std::vector<float> s;    // [M, K/32] d * sum(q): the block's sum as the kernel sees it
};

// Each 32-value block of each row: d = max|x| / 127, q = round(x / d). Rows are laid
// out with `nbp` blocks (>= K / 32; the padding blocks are zero).
QuantRows quantize_rows(const torch::Tensor& x, int64_t nbp) {
  const int64_t M = x.size(0), K = nbp * QK, nb = x.size(1) / QK, ld = x.stride(0);
  QuantRows r;
  r.q.assign(M * K, 0);
  r.d.assign(M * nbp, 0.0f);
  r.s.assign(M * nbp, 0.0f);
  const float* X = x.data_ptr<float>();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  at::parallel_for(0, M * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / nb, b = i % nb;
      const float* p = X + m * ld + b * QK;
      __m256 v0 = load8(p), v1 = load8(p + 8), v2 = load8(p + 16), v3 = load8(p + 24);
      __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                               _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
      __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
      a4 = _mm_max_ss(a4, _mm_movehdup_ps(a4));
      const float amax = _mm_cvtss_f32(a4);
      const float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m256 vid = _mm256_set1_ps(id);
      __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
      __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
      const int sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
      __m256i p16a = _mm256_packs_epi32(i0, i1), p16b = _mm256_packs_epi32(i2, i3);
      __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b), perm);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(r.q.data() + m * K + b * QK), p8);
      r.d[m * nbp + b] = d;
      r.s[m * nbp + b] = d * static_cast<float>(sum);
    }
  });
  return r;
}

// ---------------------------------------------------------------- quantized linear
//
// Weights arrive in pairs of blocks (`repack_q4_1` / `pad_q8_0` below; a row's block
// count padded to even with a zero block): q4_1 as 32 bytes whose low nibbles are
// block 2j's 32 values and high nibbles block 2j+1's, so one load and two ANDs unpack
// 64 weights (ggml's own layout takes a load, a shift, two ANDs and an insert per
// block); q8_0 as 32 signed bytes per block. Per row and block the integer dot
// product is u8 x s8 multiply-adds; 8 blocks' sums are reduced into one vector by
// shuffles and adds, so the float scale work is one multiply and FMA per 8 blocks.

enum class WFormat { Q4_1, Q8_0 };

struct QWeights {
  const uint8_t* q;   // paired blocks, `row_bytes` per weight row
  const uint16_t* d;  // [N, nb] scales, float16 (as ggml stores them: fewer bytes to read)
  const uint16_t* m;  // [N, nb] mins (q4_1), float16, or nullptr
  int64_t nb;         // blocks per row (even: padded)
  int64_t row_bytes;
};

inline __m256i dot_q4(__m256i w, __m256i x, __m256i ones) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
}
inline __m256i dot_q8(__m256i w, __m256i x, __m256i ones) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), ones);
}

template <WFormat F>
inline void load_pair(const uint8_t* row, int64_t j, __m256i& w0, __m256i& w1) {
  if (F == WFormat::Q4_1) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j * 32));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    w0 = _mm256_and_si256(raw, mask);
    w1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
  } else {
    w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j * 64));
    w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j * 64 + 32));
  }
}

template <WFormat F>
inline __m256i dotw(__m256i w, __m256i x, __m256i ones) {
  return F == WFormat::Q4_1 ? dot_q4(w, x, ones) : dot_q8(w, x, ones);
}

inline __m256 load_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float f16(uint16_t h) { return _cvtsh_ss(h); }

// Horizontal sums of int32 lanes for several blocks at once, with one-uop shuffles
// (AVX2's phaddd is several uops on Zen 3): sums2 leaves [a0, b0, a1, b1] per 128-bit
// lane (a0 + a1 = that lane's sum of a); sums4 of two such gives [A, B, C, D] per lane.
inline __m256i sums2(__m256i a, __m256i b) {
  return _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
}
inline __m256i sums4(__m256i ab, __m256i cd) {
  return _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
}

inline __m256i xblock(const int8_t* xr, int64_t b) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + b * QK));
}

// R activation rows x NC weight rows (output columns), accumulators in registers.
template <WFormat F, int R, int NC>
inline void qtile(const QWeights& W, const QuantRows& X, int64_t Kp, int64_t m0, int64_t n0, float* Y, int64_t ldy,
                  const float* bias) {
  const int64_t nb = W.nb;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[NC][R];
  float tail[NC][R];
  for (int c = 0; c < NC; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps(), tail[c][r] = 0.0f;
  const int8_t* xr[R];
  const float *xd[R], *xs[R];
  for (int r = 0; r < R; ++r) {
    xr[r] = X.q.data() + (m0 + r) * Kp;
    xd[r] = X.d.data() + (m0 + r) * nb;
    xs[r] = X.s.data() + (m0 + r) * nb;
  }
  int64_t b = 0;
  constexpr int64_t PAIR = F == WFormat::Q4_1 ? 32 : 64;  // bytes per pair of blocks
  for (; b + 8 <= nb; b += 8) {
    for (int c = 0; c < NC; ++c) {
      const int64_t n = n0 + c;
      // fixed offsets from one pointer per group: no index arithmetic in the loop body
      const uint8_t* wg = W.q + n * W.row_bytes + (b / 2) * PAIR;
      __m256i h[R][2];
      for (int half = 0; half < 2; ++half) {
        __m256i hp[R][2];
        for (int pp = 0; pp < 2; ++pp) {
          const int off = half * 2 + pp;  // pair within the group
          __m256i w0, w1;
          load_pair<F>(wg + off * PAIR, 0, w0, w1);
          for (int r = 0; r < R; ++r) {
            const int8_t* xg = xr[r] + b * QK + off * 2 * QK;
            hp[r][pp] = sums2(dotw<F>(w0, xblock(xg, 0), ones), dotw<F>(w1, xblock(xg, 1), ones));
          }
        }
        for (int r = 0; r < R; ++r) h[r][half] = sums4(hp[r][0], hp[r][1]);
      }
      const __m256 dw = load_f16(W.d + n * nb + b);
      for (int r = 0; r < R; ++r) {
        const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(h[r][0], h[r][1], 0x20),
                                              _mm256_permute2x128_si256(h[r][0], h[r][1], 0x31));
        acc[c][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(dw, _mm256_loadu_ps(xd[r] + b)),
                                    acc[c][r]);
        if (F == WFormat::Q4_1)  // the mins: min * (the block's activation sum)
          acc[c][r] = _mm256_fmadd_ps(load_f16(W.m + n * nb + b), _mm256_loadu_ps(xs[r] + b), acc[c][r]);
      }
    }
  }
  for (; b < nb; b += 2) {  // the last pairs, scaled one block at a time
    for (int c = 0; c < NC; ++c) {
      const int64_t n = n0 + c;
      __m256i w0, w1;
      load_pair<F>(W.q + n * W.row_bytes, b / 2, w0, w1);
      const float d0 = f16(W.d[n * nb + b]), d1 = f16(W.d[n * nb + b + 1]);
      const float m0v = W.m ? f16(W.m[n * nb + b]) : 0.0f, m1v = W.m ? f16(W.m[n * nb + b + 1]) : 0.0f;
      for (int r = 0; r < R; ++r) {
        const __m256i p0 = dotw<F>(w0, xblock(xr[r], b), ones), p1 = dotw<F>(w1, xblock(xr[r], b + 1), ones);
        acc[c][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * xd[r][b]), acc[c][r]);
        acc[c][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d1 * xd[r][b + 1]), acc[c][r]);
        if (F == WFormat::Q4_1) tail[c][r] += m0v * xs[r][b] + m1v * xs[r][b + 1];
      }
    }
  }
  for (int c = 0; c < NC; ++c)
    for (int r = 0; r < R; ++r)
      Y[(m0 + r) * ldy + n0 + c] = hsum(acc[c][r]) + tail[c][r] + (bias ? bias[n0 + c] : 0.0f);
}

// x: [..., K] -> [..., N]
template <WFormat F, int R>
inline void qtile_cols(const QWeights& W, const QuantRows& X, int64_t Kp, int64_t m, int64_t n0, int64_t nc, float* Y,
                       int64_t ldy, const float* bias) {
  if (nc == 2) qtile<F, R, 2>(W, X, Kp, m, n0, Y, ldy, bias);
  else qtile<F, R, 1>(W, X, Kp, m, n0, Y, ldy, bias);
}

template <WFormat F>
torch::Tensor qlinear(const torch::Tensor& x_in, const QWeights& W, int64_t N, int64_t K,
                      const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x_in.size(-1) == K, "x has ", x_in.size(-1), " features; the weight has ", K);
  const torch::Tensor x = x_in.dim() == 2 ? x_in : x_in.reshape({-1, K});
  check_f32_2d(x, "x");
  const int64_t M = x.size(0);
  const float* B = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  if (x_in.dim() != 2) {
    auto sizes = x_in.sizes().vec();
    sizes.back() = N;
    y = y.view(sizes);
  }
  const QuantRows X = quantize_rows(x, W.nb);
  const int64_t Kp = W.nb * QK;
  float* Y = y.data_ptr<float>();
  constexpr int64_t MB = 64;  // rows per block: its int8 activations stay in L2 across columns
  // At one row, two columns per tile (two FMA chains); with more rows, one column and
  // up to four rows share each unpacked weight block (two columns spill registers:
  // 15% slower at 8 rows). Columns are split over threads.
  const int64_t NCOL = M == 1 ? 2 : 1, tiles = (N + NCOL - 1) / NCOL;
  at::parallel_for(0, tiles, 16 / NCOL, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const int64_t m1 = std::min(M, m0 + MB);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * NCOL;
        if (M == 1) {
          qtile_cols<F, 1>(W, X, Kp, 0, n0, std::min<int64_t>(2, N - n0), Y, N, B);
          continue;
        }
        int64_t m = m0;
        for (; m + 4 <= m1; m += 4) qtile<F, 4, 1>(W, X, Kp, m, n0, Y, N, B);
        switch (m1 - m) {
          case 3: qtile<F, 3, 1>(W, X, Kp, m, n0, Y, N, B); break;
          case 2: qtile<F, 2, 1>(W, X, Kp, m, n0, Y, N, B); break;
          case 1: qtile<F, 1, 1>(W, X, Kp, m, n0, Y, N, B); break;
          default: break;
        }
      }
    }
  });
  return y;
}

// ggml's q4_1 blocks (16 bytes: low nibbles elements 0..15, high 16..31) -> pairs.
torch::Tensor repack_q4_1(const torch::Tensor& qs) {
  TORCH_CHECK(qs.scalar_type() == torch::kUInt8 && qs.dim() == 2 && qs.is_contiguous() && qs.size(1) % 16 == 0,
              "q4_1 blocks: contiguous uint8 [N, K/2]");
  const int64_t N = qs.size(0), nb = qs.size(1) / 16, nbp = nb + (nb & 1);
  auto out = torch::zeros({N, nbp * 16}, qs.options());
  const uint8_t* src = qs.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = src + (n * nb + b) * 16;
      uint8_t* pair = dst + n * nbp * 16 + (b / 2) * 32;
      const int shift = (b & 1) ? 4 : 0;
      for (int i = 0; i < 16; ++i) {
        pair[i] |= static_cast<uint8_t>((blk[i] & 0x0F) << shift);
        pair[16 + i] |= static_cast<uint8_t>((blk[i] >> 4) << shift);
      }
    }
  return out;
}

torch::Tensor linear_q4_1(const torch::Tensor& x, const torch::Tensor& pairs, const torch::Tensor& d,
                          const torch::Tensor& m, int64_t K, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(pairs.scalar_type() == torch::kUInt8 && pairs.is_contiguous() && d.is_contiguous() &&
              m.is_contiguous() && d.scalar_type() == torch::kHalf && m.scalar_type() == torch::kHalf &&
              pairs.size(1) == d.size(1) * 16 && d.size(1) % 2 == 0 && d.size(1) * QK >= K,
              "q4_1: repacked pairs [N, nb*16] with float16 d, m [N, nb] (nb even)");
  QWeights W{pairs.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()),
             reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>()), d.size(1), pairs.size(1)};
  return qlinear<WFormat::Q4_1>(x, W, pairs.size(0), K, bias);
}

torch::Tensor linear_q8_0(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d, int64_t K,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(qs.scalar_type() == torch::kInt8 && qs.is_contiguous() && d.is_contiguous() &&
              d.scalar_type() == torch::kHalf && qs.size(1) == d.size(1) * QK && d.size(1) % 2 == 0 &&
              d.size(1) * QK >= K, "q8_0: int8 [N, nb*32] with float16 d [N, nb] (nb even)");
  QWeights W{reinterpret_cast<const uint8_t*>(qs.data_ptr<int8_t>()),
             reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()), nullptr, d.size(1), qs.size(1)};
  return qlinear<WFormat::Q8_0>(x, W, qs.size(0), K, bias);
}

// q8_0 weights with float32 activations (no activation rounding): for the output
// layer, whose input the int8 rounding moves enough to change greedy answers of a
// small model. Weights widened in registers, 8 at a time, shared by up to 4 rows;
// per row independent products per block and two accumulators (bound by loads, not
// an FMA chain), the same operations whatever the number of rows in the tile.
template <int R>
inline void q8f_tile(const int8_t* Wq, const uint16_t* Wd, int64_t nb, const float* X, int64_t ldx, int64_t m0,
                     int64_t n, float* Y, int64_t ldy, const float* bias) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const int8_t* wr = Wq + n * nb * QK;
  auto widen = [&](int64_t b, int sub) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + b * QK + sub * 8))));
  };
  for (int64_t b = 0; b < nb; ++b) {
    __m256 t01[R];
    const __m256 w0 = widen(b, 0), w1 = widen(b, 1);
    for (int r = 0; r < R; ++r) {
      const float* x = X + (m0 + r) * ldx + b * QK;
      t01[r] = _mm256_add_ps(_mm256_mul_ps(w0, load8(x)), _mm256_mul_ps(w1, load8(x + 8)));
    }
    const __m256 w2 = widen(b, 2), w3 = widen(b, 3), d = _mm256_set1_ps(f16(Wd[n * nb + b]));
    for (int r = 0; r < R; ++r) {
      const float* x = X + (m0 + r) * ldx + b * QK;
      const __m256 t23 = _mm256_add_ps(_mm256_mul_ps(w2, load8(x + 16)), _mm256_mul_ps(w3, load8(x + 24)));
      acc[r][b & 1] = _mm256_fmadd_ps(_mm256_add_ps(t01[r], t23), d, acc[r][b & 1]);
    }
  }
  for (int r = 0; r < R; ++r)
    Y[(m0 + r) * ldy + n] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + (bias ? bias[n] : 0.0f);
}

torch::Tensor linear_q8_0_f32(const torch::Tensor& x_in, const torch::Tensor& qs, const torch::Tensor& d, int64_t K,
                              const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(qs.scalar_type() == torch::kInt8 && qs.is_contiguous() && d.is_contiguous() &&
              d.scalar_type() == torch::kHalf && qs.size(1) == d.size(1) * QK && x_in.size(-1) == K &&
              K % QK == 0, "q8_0: int8 [N, nb*32] with float16 d [N, nb]");
  const torch::Tensor x = x_in.dim() == 2 ? x_in : x_in.reshape({-1, K});
  check_f32_2d(x, "x");
  const int64_t M = x.size(0), N = qs.size(0), nb = K / QK, ldx = x.stride(0);
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  auto y = torch::empty(sizes, x.options());
  const int8_t* Wq = qs.data_ptr<int8_t>();
  const uint16_t* Wd = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const float* X = x.data_ptr<float>();
  const float* B = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
  // Blocks of 16 columns (their weights stay in L1/L2) by tiles of 4 rows (in L1).
  constexpr int64_t NBLK = 16;
  at::parallel_for(0, (N + NBLK - 1) / NBLK, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n1 = std::min(N, (blk + 1) * NBLK);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4)
        for (int64_t n = blk * NBLK; n < n1; ++n) q8f_tile<4>(Wq, Wd, nb, X, ldx, m, n, Y, N, B);
      for (int64_t n = blk * NBLK; n < n1; ++n) {
        switch (M - m) {
          case 3: q8f_tile<3>(Wq, Wd, nb, X, ldx, m, n, Y, N, B); break;
          case 2: q8f_tile<2>(Wq, Wd, nb, X, ldx, m, n, Y, N, B); break;
          case 1: q8f_tile<1>(Wq, Wd, nb, X, ldx, m, n, Y, N, B); break;
          default: break;
        }
      }
    }
  });
  return y;
}

// ---------------------------------------------------------------- bf16 weights

// R rows x one column; per row two FMA chains over K in strides of 16 (one chain ran
// a one-row GEMV at ~18 GB/s of the host's ~32: too few loads in flight; four chains
// leave room for too few rows per tile). Every R runs the same operations per output,
// so a row's result does not depend on R.
template <int R>
inline void bf16_tile(const uint16_t* Wt, int64_t K, const float* X, int64_t ldx, int64_t m0, int64_t n, float* Y,
                      int64_t ldy, const float* bias) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const uint16_t* w = Wt + n * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    for (int j = 0; j < 2; ++j) {
      const __m256 wv = load_bf16(w + k + 8 * j);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(wv, load8(X + (m0 + r) * ldx + k + 8 * j), acc[r][j]);
    }
  for (; k < K; k += 8) {
    const __m256 wv = load_bf16(w + k);
    for (int r = 0; r < R; ++r) acc[r][0] = _mm256_fmadd_ps(wv, load8(X + (m0 + r) * ldx + k), acc[r][0]);
  }
  for (int r = 0; r < R; ++r)
    Y[(m0 + r) * ldy + n] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + (bias ? bias[n] : 0.0f);
}

torch::Tensor linear_bf16(const torch::Tensor& x_in, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  const torch::Tensor x = x_in.dim() == 2 ? x_in : x_in.reshape({-1, x_in.size(-1)});
  check_f32_2d(x, "x");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(1) && x.size(1) % 8 == 0,
              "bf16 weight must be contiguous [out, in] with in a multiple of 8 matching x");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldx = x.stride(0);
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  auto y = torch::empty(sizes, x.options());
  const uint16_t* Wt = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* X = x.data_ptr<float>();
  const float* B = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
  // Blocks of 16 columns (their weights stay in L1/L2) by tiles of 4 rows (in L1).
  constexpr int64_t NB = 16;
  at::parallel_for(0, (N + NB - 1) / NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n1 = std::min(N, (blk + 1) * NB);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4)
        for (int64_t n = blk * NB; n < n1; ++n) bf16_tile<4>(Wt, K, X, ldx, m, n, Y, N, B);
      for (int64_t n = blk * NB; n < n1; ++n) {
        switch (M - m) {
          case 3: bf16_tile<3>(Wt, K, X, ldx, m, n, Y, N, B); break;
          case 2: bf16_tile<2>(Wt, K, X, ldx, m, n, Y, N, B); break;
          case 1: bf16_tile<1>(Wt, K, X, ldx, m, n, Y, N, B); break;
          default: break;
        }
      }
    }
  });
  return y;
}

// ---------------------------------------------------------------- norms, rotary, MLP

inline float row_inv_rms(const float* x, int64_t D, float eps) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) {
    __m256 a = load8(x + i), b = load8(x + i + 8);
    s0 = _mm256_fmadd_ps(a, a, s0);
    s1 = _mm256_fmadd_ps(b, b, s1);
  }
  float ss = hsum(_mm256_add_ps(s0, s1));
  for (; i < D; ++i) ss += x[i] * x[i];
  return 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
}

inline void scale_row(const float* x, const float* w, float inv, float* out, int64_t D) {
  const __m256 vinv = _mm256_set1_ps(inv);
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) store8(out + i, _mm256_mul_ps(_mm256_mul_ps(load8(x + i), vinv), load8(w + i)));
  for (; i < D; ++i) out[i] = x[i] * inv * w[i];
}

torch::Tensor rms_norm(const torch::Tensor& x_in, const torch::Tensor& w, double eps) {
  const torch::Tensor x = x_in.dim() == 2 ? x_in : x_in.reshape({-1, x_in.size(-1)});
  check_f32_2d(x, "x");
  const int64_t M = x.size(0), D = x.size(1);
  auto out = torch::empty(x_in.sizes(), x.options());
  const float *X = x.data_ptr<float>(), *Wp = w.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, M, 64, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m)
      scale_row(X + m * x.stride(0), Wp, row_inv_rms(X + m * x.stride(0), D, static_cast<float>(eps)), O + m * D, D);
  });
  return out;
}

// residual += x (in place); returns rms_norm(residual). Any leading dims.
torch::Tensor add_rms_norm(const torch::Tensor& x_in, torch::Tensor& residual, const torch::Tensor& w, double eps) {
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x_in.sizes() && residual.scalar_type() == torch::kFloat32,
              "residual must be a contiguous float32 tensor shaped as x");
  const torch::Tensor x = x_in.dim() == 2 ? x_in : x_in.reshape({-1, x_in.size(-1)});
  check_f32_2d(x, "x");
  const int64_t M = x.size(0), D = x.size(1);
  auto out = torch::empty(x_in.sizes(), x.options());
  const float *X = x.data_ptr<float>(), *Wp = w.data_ptr<float>();
  float *Rp = residual.data_ptr<float>(), *O = out.data_ptr<float>();
  at::parallel_for(0, M, 64, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      float* r = Rp + m * D;
      const float* xr = X + m * x.stride(0);
      int64_t i = 0;
      for (; i + 8 <= D; i += 8) store8(r + i, _mm256_add_ps(load8(r + i), load8(xr + i)));
      for (; i < D; ++i) r[i] += xr[i];
      scale_row(r, Wp, row_inv_rms(r, D, static_cast<float>(eps)), O + m * D, D);
    }
  });
  return out;
}

// x[..., h, :] for h < heads: x * cos + rotate_half(x) * sin (sin carries rotate_half's
// sign: [-sin, sin]), in place. x: contiguous [..., H, D] (N tokens x H heads); cos/sin:
// contiguous, N x D values (the rotary's [B, T, 1, D] tables as they are).
void rope_(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() >= 3 && x.is_contiguous(), "x must be contiguous float32 [..., H, D]");
  const int64_t H = x.size(-2), D = x.size(-1), N = x.numel() / (H * D), half = D / 2;
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == torch::kFloat32 &&
              sin.scalar_type() == torch::kFloat32 && cos.numel() == N * D && sin.numel() == N * D && heads <= H,
              "cos/sin: contiguous float32 with one row of D values per token");
  float* X = x.data_ptr<float>();
  const float *C = cos.data_ptr<float>(), *S = sin.data_ptr<float>();
  at::parallel_for(0, N * heads, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = i / heads, h = i % heads;
      float* p = X + (n * H + h) * D;
      const float *c = C + n * D, *s = S + n * D;
      int64_t j = 0;
      for (; j + 8 <= half; j += 8) {
        __m256 a = load8(p + j), bb = load8(p + half + j);
        __m256 ra = _mm256_fmadd_ps(bb, load8(s + j), _mm256_mul_ps(a, load8(c + j)));
        __m256 rb = _mm256_fmadd_ps(a, load8(s + half + j), _mm256_mul_ps(bb, load8(c + half + j)));
        store8(p + j, ra);
        store8(p + half + j, rb);
      }
      for (; j < half; ++j) {
        const float a = p[j], bb = p[half + j];
        p[j] = a * c[j] + bb * s[j];
        p[half + j] = bb * c[half + j] + a * s[half + j];
      }
    }
  });
}

// gu: [..., 2I] (gate then up) -> silu(gate) * up, [..., I].
torch::Tensor silu_mul(const torch::Tensor& gu_in) {
  const torch::Tensor gu = gu_in.dim() == 2 ? gu_in : gu_in.reshape({-1, gu_in.size(-1)});
  check_f32_2d(gu, "gate_up");
  const int64_t M = gu.size(0), I = gu.size(1) / 2;
  auto sizes = gu_in.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, gu.options());
  const float* G = gu.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float *g = G + m * gu.stride(0), *u = g + I;
      float* o = O + m * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        __m256 gv = load8(g + i);
        __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, gv))));
        store8(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), load8(u + i)));
      }
      for (; i < I; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// ---------------------------------------------------------------- decode attention

// q . k over D (a multiple of 8) as 8 lane partials.
template <typename C>
inline __m256 dot_partial(const float* q, const C* k, int64_t D) {
  __m256 a = _mm256_mul_ps(load8(q), load8(k));
  for (int64_t i = 8; i < D; i += 8) a = _mm256_fmadd_ps(load8(q + i), load8(k + i), a);
  return a;
}

// [hsum(p[0]), ..., hsum(p[7])] with shuffles and adds (no per-vector horizontal sum).
inline __m256 reduce8(const __m256* p) {
  auto s2 = [](__m256 a, __m256 b) { return _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b)); };
  auto s4 = [](__m256 ab, __m256 cd) {
    return _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))),
                         _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab), _mm256_castps_pd(cd))));
  };
  const __m256 x0 = s4(s2(p[0], p[1]), s2(p[2], p[3])), x1 = s4(s2(p[4], p[5]), s2(p[6], p[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(x0, x1, 0x20), _mm256_permute2f128_ps(x0, x1, 0x31));
}

// out[x][0 : 8 NV] = sum over c of p[x][c] * V[c][0 : 8 NV] for NG heads (p rows W apart).
template <typename C, int NG, int NV>
inline void pv_pass(const float* p, int64_t W, const C* v, int64_t vw, float* out, int64_t out_stride) {
  __m256 a[NG][NV];
  for (int x = 0; x < NG; ++x)
    for (int y = 0; y < NV; ++y) a[x][y] = _mm256_setzero_ps();
  for (int64_t c = 0; c < W; ++c) {
    __m256 vv[NV];
    for (int y = 0; y < NV; ++y) vv[y] = load8(v + c * vw + 8 * y);
    for (int x = 0; x < NG; ++x) {
      const __m256 pw = _mm256_set1_ps(p[x * W + c]);
      for (int y = 0; y < NV; ++y) a[x][y] = _mm256_fmadd_ps(pw, vv[y], a[x][y]);
    }
  }
  for (int x = 0; x < NG; ++x)
    for (int y = 0; y < NV; ++y) _mm256_storeu_ps(out + x * out_stride + 8 * y, a[x][y]);
}

template <typename C>
void decode_attention_impl(const torch::Tensor& q, torch::Tensor& kc, torch::Tensor& vc, const torch::Tensor& k,
                           const torch::Tensor& v, const int64_t* pos, float scale, int64_t window, float softcap,
                           torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(-2), D = q.size(-1), KVH = k.size(-2), G = H / KVH;
  const int64_t qb = q.stride(0), qh = q.stride(-2), kb = k.stride(0), khs = k.stride(-2), vb = v.stride(0),
                vhs = v.stride(-2);
  const float *Q = q.data_ptr<float>(), *Kn = k.data_ptr<float>(), *Vn = v.data_ptr<float>();
  C* KC = reinterpret_cast<C*>(kc.data_ptr());
  C* VC = reinterpret_cast<C*>(vc.data_ptr());
  float* O = out.data_ptr<float>();
  const int64_t kr = kc.stride(0), kh = kc.stride(1), kw = kc.stride(2);
  const int64_t vr = vc.stride(0), vh = vc.stride(1), vw = vc.stride(2);
  // Tasks are (row, kv head, a range of its query heads): with few rows, a kv head's
  // query heads are split too, so both threads have work at batch 1.
  const int64_t splits = B * KVH >= 2 * at::get_num_threads() ? 1 : G;
  const int64_t Gs = G / splits;
  for (int64_t b = 0; b < B; ++b)  // each row's new K/V at its own column, before any task reads it
    for (int64_t h = 0; h < KVH; ++h) {
      C* kd = KC + b * kr + h * kh + pos[b] * kw;
      C* vd = VC + b * vr + h * vh + pos[b] * vw;
      const float *kn = Kn + b * kb + h * khs, *vn = Vn + b * vb + h * vhs;
      for (int64_t i = 0; i < D; i += 8) {
        store8(kd + i, load8(kn + i));
        store8(vd + i, load8(vn + i));
      }
    }
  at::parallel_for(0, B * KVH * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / splits, g0 = (task % splits) * Gs;
      const int64_t b = t / KVH, h = t % KVH, p = pos[b];
      C* krow = KC + b * kr + h * kh;
      C* vrow = VC + b * vr + h * vh;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0, W = p + 1 - lo;
      scores.resize(Gs * W);
      for (int64_t g = 0; g < Gs; ++g) {
        const float* qp = Q + b * qb + (h * G + g0 + g) * qh;
        float* sp = scores.data() + g * W;
        int64_t c = 0;
        for (; c + 8 <= W; c += 8) {  // 8 columns' dot products, reduced into one vector
          // D outer, columns inner: eight independent FMA chains
          const C* k0 = krow + (lo + c) * kw;
          __m256 part[8];
          const __m256 q0 = load8(qp);
          for (int j = 0; j < 8; ++j) part[j] = _mm256_mul_ps(q0, load8(k0 + j * kw));
          for (int64_t i = 8; i < D; i += 8) {
            const __m256 qi = load8(qp + i);
            for (int j = 0; j < 8; ++j) part[j] = _mm256_fmadd_ps(qi, load8(k0 + j * kw + i), part[j]);
          }
          _mm256_storeu_ps(sp + c, reduce8(part));
        }
        for (; c < W; ++c) sp[c] = hsum(dot_partial(qp, krow + (lo + c) * kw, D));
        if (softcap > 0.0f)
          for (c = 0; c < W; ++c) sp[c] = softcap * std::tanh(sp[c] * scale / softcap);
        else
          for (c = 0; c < W; ++c) sp[c] *= scale;
      }
      for (int64_t g = 0; g < Gs; ++g) {  // softmax over the row's columns
        float* sp = scores.data() + g * W;
        float mx = -INFINITY;
        for (int64_t c = 0; c < W; ++c) mx = std::max(mx, sp[c]);
        const __m256 vmx = _mm256_set1_ps(mx);
        __m256 vs = _mm256_setzero_ps();
        int64_t c = 0;
        for (; c + 8 <= W; c += 8) {
          __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sp + c), vmx));
          _mm256_storeu_ps(sp + c, e);
          vs = _mm256_add_ps(vs, e);
        }
        float sum = hsum(vs);
        for (; c < W; ++c) {
          sp[c] = std::exp(sp[c] - mx);
          sum += sp[c];
        }
        const float inv = 1.0f / sum;
        for (c = 0; c < W; ++c) sp[c] *= inv;
      }
      // probs x V, accumulated in registers: up to 3 heads x 32 dims (12 vectors) per pass
      for (int64_t g = 0; g < Gs; g += 3) {
        float* out = O + b * H * D + (h * G + g0 + g) * D;
        const float* pr = scores.data() + g * W;
        for (int64_t i = 0; i < D; i += 32) {
          const C* vp = vrow + lo * vw + i;
          if (D - i >= 32) {
            switch (std::min<int64_t>(3, Gs - g)) {
              case 3: pv_pass<C, 3, 4>(pr, W, vp, vw, out + i, D); break;
              case 2: pv_pass<C, 2, 4>(pr, W, vp, vw, out + i, D); break;
              default: pv_pass<C, 1, 4>(pr, W, vp, vw, out + i, D); break;
            }
          } else {  // D % 32 == 8, 16 or 24: the last dims one vector at a time
            for (int64_t gg = g; gg < std::min<int64_t>(Gs, g + 3); ++gg)
              for (int64_t ii = i; ii < D; ii += 8)
                pv_pass<C, 1, 1>(scores.data() + gg * W, W, vrow + lo * vw + ii, vw, O + b * H * D + (h * G + g0 + gg) * D + ii, D);
          }
        }
      }
    }
  });
}

// q: [B, H, D] or [B, 1, H, D]; k, v likewise with KVH heads (float32, unit stride in
// D); kc, vc: one layer's cache [rows, KVH, width, D] (float32 or bf16); positions:
// [B] int64, the column each row's new token goes to. Returns [B, (1,) H * D].
torch::Tensor decode_attention(const torch::Tensor& q, torch::Tensor& kc, torch::Tensor& vc, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& positions, double scale, int64_t window,
                               double softcap) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
              v.scalar_type() == torch::kFloat32, "q/k/v must be float32");
  const int64_t dims = q.dim();
  TORCH_CHECK((dims == 3 || (dims == 4 && q.size(1) == 1)) && k.dim() == dims && v.dim() == dims,
              "q/k/v: [B, heads, D] or [B, 1, heads, D]");
  TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1 && v.stride(-1) == 1 && q.size(-1) % 8 == 0,
              "q/k/v need unit stride in D, D a multiple of 8");
  TORCH_CHECK(kc.stride(3) == 1 && vc.stride(3) == 1 && kc.scalar_type() == vc.scalar_type(), "bad cache layout");
  TORCH_CHECK(positions.scalar_type() == torch::kLong && positions.is_contiguous(), "positions: int64");
  const int64_t B = q.size(0);
  TORCH_CHECK(kc.size(0) >= B && positions.numel() == B && q.size(-2) % k.size(-2) == 0 &&
              k.size(-2) == kc.size(1) && q.size(-1) == kc.size(3), "bad shapes");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(pos[b] >= 0 && pos[b] < kc.size(2), "position out of the cache");
  auto out = dims == 3 ? torch::empty({B, q.size(-2) * q.size(-1)}, q.options())
                       : torch::empty({B, 1, q.size(-2) * q.size(-1)}, q.options());
  if (kc.scalar_type() == torch::kFloat32)
    decode_attention_impl<float>(q, kc, vc, k, v, pos, scale, window, softcap, out);
  else if (kc.scalar_type() == torch::kBFloat16)
    decode_attention_impl<uint16_t>(q, kc, vc, k, v, pos, scale, window, softcap, out);
  else
    TORCH_CHECK(false, "cache dtype must be float32 or bfloat16");
  return out;
}

// ---------------------------------------------------------------- a decoder block's halves

// One of the block's linear layers as the kernels above run it.
struct BlockLinear {
  int64_t kind = -1;  // 0: q4_1 pairs, 1: q8_0, 2: bf16 weights
  torch::Tensor a, b, c;
  int64_t K = 0;
  c10::optional<torch::Tensor> bias;

  torch::Tensor operator()(const torch::Tensor& x) const {
    if (kind == 0) return linear_q4_1(x, a, b, c, K, bias);
    if (kind == 1) return linear_q8_0(x, a, b, K, bias);
    return linear_bf16(x, a, bias);
  }
};

// A Llama-family block's work around attention for few-token steps, in two calls
// (the model still hands q/k/v to the caller's attention context in between):
// pre: residual add + RMSNorm, QKV, rotary; post: O, residual add + RMSNorm, gate/up,
// SiLU * up, down. Each Python-level op of the eager block costs ~2-4 us of dispatch,
// ~30 per block; these are two.
struct FusedBlock {
  torch::Tensor attn_norm, mlp_norm;
  double eps;
  int64_t heads, kv_heads, head_dim;
  BlockLinear qkv, o, gate_up, down;

  // x, residual: [B, T, D] (residual None for the first block: it becomes x).
  // Returns (q, k, v, residual), q/k/v views of one [B, T, H + 2 KVH, D] tensor.
  std::vector<torch::Tensor> pre(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                 const torch::Tensor& cos, const torch::Tensor& sin) const {
    torch::Tensor res, h;
    if (residual.has_value() && residual->defined()) {
      res = *residual;
      h = add_rms_norm(x, res, attn_norm, eps);
    } else {
      res = x;
      h = rms_norm(x, attn_norm, eps);
    }
    auto sizes = x.sizes().vec();
    sizes.back() = heads + 2 * kv_heads;
    sizes.push_back(head_dim);
    torch::Tensor qkv_out = qkv(h).view(sizes);
    rope_(qkv_out, cos, sin, heads + kv_heads);
    auto parts = qkv_out.split_with_sizes({heads, kv_heads, kv_heads}, -2);
    return {parts[0], parts[1], parts[2], res};
  }

  // attn: [B, T, H * D]. Returns (MLP output, residual stream): the next norm adds them.
  std::vector<torch::Tensor> post(const torch::Tensor& attn, torch::Tensor& residual) const {
    torch::Tensor h = add_rms_norm(o(attn), residual, mlp_norm, eps);
    return {down(silu_mul(gate_up(h))), residual};
  }
};

BlockLinear make_linear(int64_t kind, std::vector<torch::Tensor> parts, int64_t K, c10::optional<torch::Tensor> bias) {
  BlockLinear l;
  l.kind = kind;
  l.a = parts.at(0);
  if (parts.size() > 1) l.b = parts[1];
  if (parts.size() > 2) l.c = parts[2];
  l.K = K;
  l.bias = bias;
  return l;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("repack_q4_1", &repack_q4_1, "ggml q4_1 nibbles -> the kernel's block pairs");
  mod.def("linear_q4_1", &linear_q4_1, "x @ dequant(Q4_1 W).T with int8 activations");
  mod.def("linear_q8_0", &linear_q8_0, "x @ dequant(Q8_0 W).T with int8 activations");
  mod.def("linear_q8_0_f32", &linear_q8_0_f32, "x @ dequant(Q8_0 W).T, float32 activations");
  mod.def("linear_bf16", &linear_bf16, "x @ W.T, bf16 W, float32 x");
  mod.def("rms_norm", &rms_norm);
  mod.def("add_rms_norm", &add_rms_norm);
  mod.def("rope_", &rope_);
  mod.def("silu_mul", &silu_mul);
  mod.def("decode_attention", &decode_attention);
  py::class_<BlockLinear>(mod, "BlockLinear");
  mod.def("block_linear", &make_linear);
  py::class_<FusedBlock>(mod, "FusedBlock")
      .def(py::init([](torch::Tensor attn_norm, torch::Tensor mlp_norm, double eps, int64_t heads, int64_t kv_heads,
                       int64_t head_dim, BlockLinear qkv, BlockLinear o, BlockLinear gate_up, BlockLinear down) {
        return FusedBlock{attn_norm, mlp_norm, eps, heads, kv_heads, head_dim, qkv, o, gate_up, down};
      }))
      .def("pre", &FusedBlock::pre)
      .def("post", &FusedBlock::post);
}
