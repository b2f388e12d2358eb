"""C++ source of the packed ternary CPU kernel (`bitmar.kernels.packed_cpu` compiles, loads and dispatches it).

A Python string rather than a .cpp file: the Hugging Face export flattens the kernel sources into the remote code
(bitmar/export/flatten.py MODEL_SOURCES), so an exported model builds the same kernel without the bitmar package.
"""

from __future__ import annotations

PACKED_KERNEL_CPP = r"""
// BitMar packed ternary linear (CPU): y (N, in) float32 -> int8 codes -> exact integer dot products with 2-bit
// ternary weights read straight from pack_ternary's bytes -> (N, out) float32, matching BitLinear eval bit for bit.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BITMAR_X86 1
#else
#define BITMAR_X86 0
#endif

namespace {

constexpr int64_t ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2;
// Weight rows stream from DRAM once per token (the LM head evicts them): prefetching ~10 rows ahead doubled the
// kernel's bandwidth in a decoding-like loop (2.6 -> 3.6 GB/s on a loaded 2-core Xeon; prefetch never faults).
constexpr int64_t PREFETCH_BYTES = 2048;

// Virtual layout of one weight row: row o starts at flat element o*in, i.e. at byte (o*in)/4 with `shift` =
// (o*in)%4 elements of the previous row in front. Byte j of a chunk of CB bytes holds elements 4j..4j+3, so after
// `(v >> 2s) & 3` vector s holds the codes of elements 4j+s: the activations are laid out to match (xv below),
// padded with zeros (a zero activation cancels whatever code sits there: the previous row's tail, the padding).
struct Layout {
  int64_t in, out, cb, block, lp, nshift;  // chunk bytes, elements per chunk (4*cb), padded length, shift variants
};

Layout make_layout(int64_t in, int64_t out, int64_t cb) {
  Layout l{in, out, cb, 4 * cb, 0, (in % 4) ? 4 : 1};
  const int64_t span = in + (l.nshift > 1 ? 3 : 0);
  l.lp = (span + l.block - 1) / l.block * l.block;
  return l;
}

// xv[(sh * N + n) * lp + v]: activation code of virtual element v of a row with shift sh.
void permute_codes(const int8_t* codes, int64_t n_rows, const Layout& l, int8_t* xv) {
  for (int64_t sh = 0; sh < l.nshift; ++sh) {
    for (int64_t n = 0; n < n_rows; ++n) {
      int8_t* dst = xv + (sh * n_rows + n) * l.lp;
      const int8_t* src = codes + n * l.in;
      for (int64_t b = 0; b < l.lp; b += l.block) {
        for (int64_t s = 0; s < 4; ++s) {
          for (int64_t j = 0; j < l.cb; ++j) {
            const int64_t k = b + 4 * j + s - sh;
            dst[b + s * l.cb + j] = (k >= 0 && k < l.in) ? src[k] : 0;
          }
        }
      }
    }
  }
}

#if BITMAR_X86
__attribute__((target("avx2"))) inline int32_t hsum256(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2"))) inline __m256i load256(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// dot[o * RN + r] = sum over the row of code * x for RO weight rows and RN activation rows (codes in {0, 1, 2}:
// the caller subtracts sum(x)). Several weight rows at once keep independent accumulator chains in flight
// (one row alone waits on the latency of its own chain); the activations of row o are x[o * RN + r].
template <int RO, int RN>
__attribute__((target("avx2"))) void dot_avx2(const uint8_t* const* w, const uint8_t* w_end, const int8_t* const* x,
                                              int64_t nblk, int32_t* res) {
  const __m256i m3 = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[RO * RN];
  for (int i = 0; i < RO * RN; ++i) acc[i] = _mm256_setzero_si256();
  alignas(32) uint8_t tail[32];
  for (int64_t b = 0; b < nblk; ++b) {
    for (int o = 0; o < RO; ++o) {
      const uint8_t* p = w[o] + b * 32;
      if ((b & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_BYTES), _MM_HINT_T0);
      __m256i v;
      if (p + 32 <= w_end) {
        v = load256(p);
      } else {  // the last rows: never read past the buffer
        std::memset(tail, 1 | 4 | 16 | 64, 32);
        if (p < w_end) std::memcpy(tail, p, w_end - p);
        v = load256(tail);
      }
      const __m256i c0 = _mm256_and_si256(v, m3);
      const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(v, 2), m3);
      const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m3);
      const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(v, 6), m3);
      for (int r = 0; r < RN; ++r) {
        const int8_t* xr = x[o * RN + r] + b * 128;
        // |code * x| <= 256, so a pair sums to <= 512 and four pairs to <= 2048: no int16 saturation.
        __m256i s = _mm256_maddubs_epi16(c0, load256(xr));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c1, load256(xr + 32)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c2, load256(xr + 64)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c3, load256(xr + 96)));
        acc[o * RN + r] = _mm256_add_epi32(acc[o * RN + r], _mm256_madd_epi16(s, ones));
      }
    }
  }
  for (int i = 0; i < RO * RN; ++i) res[i] = hsum256(acc[i]);
}

#if defined(__GNUC__) && (__GNUC__ >= 9 || defined(__clang__))
#define BITMAR_HAVE_AVX512 1
template <int RO, int RN>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void dot_avx512(const uint8_t* const* w, const uint8_t* w_end,
                                                                        const int8_t* const* x, int64_t nblk,
                                                                        int32_t* res) {
  const __m512i m3 = _mm512_set1_epi8(3);
  __m512i acc[RO * RN];
  for (int i = 0; i < RO * RN; ++i) acc[i] = _mm512_setzero_si512();
  for (int64_t b = 0; b < nblk; ++b) {
    for (int o = 0; o < RO; ++o) {
      const uint8_t* p = w[o] + b * 64;
      _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_BYTES), _MM_HINT_T0);
      __m512i v;
      if (p + 64 <= w_end) {
        v = _mm512_loadu_si512(p);
      } else {
        const int64_t left = std::max<int64_t>(0, w_end - p);
        const __mmask64 mask = left >= 64 ? ~__mmask64(0) : ((__mmask64(1) << left) - 1);
        v = _mm512_mask_loadu_epi8(_mm512_set1_epi8(1 | 4 | 16 | 64), mask, p);  // masked: no read past the end
      }
      const __m512i c0 = _mm512_and_si512(v, m3);
      const __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(v, 2), m3);
      const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(v, 4), m3);
      const __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(v, 6), m3);
      for (int r = 0; r < RN; ++r) {
        const int8_t* xr = x[o * RN + r] + b * 256;
        __m512i& a = acc[o * RN + r];
        a = _mm512_dpbusd_epi32(a, c0, _mm512_loadu_si512(xr));
        a = _mm512_dpbusd_epi32(a, c1, _mm512_loadu_si512(xr + 64));
        a = _mm512_dpbusd_epi32(a, c2, _mm512_loadu_si512(xr + 128));
        a = _mm512_dpbusd_epi32(a, c3, _mm512_loadu_si512(xr + 192));
      }
    }
  }
  for (int i = 0; i < RO * RN; ++i) res[i] = _mm512_reduce_add_epi32(acc[i]);
}
#else
#define BITMAR_HAVE_AVX512 0
#endif
#endif  // BITMAR_X86

bool cpu_has(int64_t isa) {
  if (isa == ISA_SCALAR) return true;
#if BITMAR_X86
  __builtin_cpu_init();
  if (isa == ISA_AVX2) return __builtin_cpu_supports("avx2");
#if BITMAR_HAVE_AVX512
  if (isa == ISA_AVX512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
#endif
#endif
  return false;
}

using DotFn = void (*)(const uint8_t* const*, const uint8_t*, const int8_t* const*, int64_t, int32_t*);

#if BITMAR_X86
template <template <int, int> class K, int RO>
DotFn pick_rn(int rn) {
  switch (rn) {
    case 1: return K<RO, 1>::fn;
    case 2: return K<RO, 2>::fn;
    case 3: return K<RO, 3>::fn;
    default: return K<RO, 4>::fn;
  }
}
template <int RO, int RN>
struct Avx2 {
  static constexpr DotFn fn = dot_avx2<RO, RN>;
};
#if BITMAR_HAVE_AVX512
template <int RO, int RN>
struct Avx512 {
  static constexpr DotFn fn = dot_avx512<RO, RN>;
};
#endif
#endif

// ro: weight rows per call (1, 2 or 4), rn: activation rows (1..4)
DotFn pick(int64_t isa, int ro, int rn) {
#if BITMAR_X86
  if (isa == ISA_AVX2) return ro == 4 ? pick_rn<Avx2, 4>(rn) : ro == 2 ? pick_rn<Avx2, 2>(rn) : pick_rn<Avx2, 1>(rn);
#if BITMAR_HAVE_AVX512
  if (isa == ISA_AVX512) {
    return ro == 4 ? pick_rn<Avx512, 4>(rn) : ro == 2 ? pick_rn<Avx512, 2>(rn) : pick_rn<Avx512, 1>(rn);
  }
#endif
#endif
  return nullptr;
}

// Activation rows that share one pass over a weight row; a tile of X_TILE rows stays in L1/L2 while the thread's
// weight rows stream through (large N: prefill, evaluation batches).
constexpr int64_t X_TILE = 32;

// Weight rows per thread: at least PARALLEL_MIN_MACS multiply-adds each. A decoding step's layers (1 row, <= 3.2M
// multiply-adds, ~0.1 ms) stay on one thread: waking a second one cost more than it saved, and on a busy machine an
// OpenMP barrier waiting for a descheduled thread made 2-thread calls 3x slower than 1-thread ones (measured).
constexpr int64_t PARALLEL_MIN_MACS = int64_t(1) << 22;
int64_t parallel_grain(int64_t in, int64_t n_rows) {
  return std::max<int64_t>(4, PARALLEL_MIN_MACS / std::max<int64_t>(1, in * n_rows));
}
constexpr int64_t GEMM_TILE = 256;

at::Tensor packed_ternary_linear(const at::Tensor& y, const at::Tensor& packed, int64_t out_features,
                                 const at::Tensor& gamma, const c10::optional<at::Tensor>& bias, int64_t q_max,
                                 int64_t isa, int64_t gemm_min_rows) {
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kFloat && y.dim() == 2 && y.is_contiguous(),
              "packed_ternary_linear: y must be a contiguous (N, in) float32 CPU tensor");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 1 &&
                  packed.is_contiguous(),
              "packed_ternary_linear: packed must be a contiguous 1-d uint8 CPU tensor");
  TORCH_CHECK(gamma.device().is_cpu() && gamma.scalar_type() == at::kFloat && gamma.numel() == 1,
              "packed_ternary_linear: gamma must be one float32 CPU value");
  TORCH_CHECK(q_max >= 1 && q_max <= 127, "packed_ternary_linear: q_max must be in [1, 127]");
  TORCH_CHECK(isa == ISA_SCALAR || cpu_has(isa), "packed_ternary_linear: this CPU or build lacks ISA ", isa);
  const int64_t n_rows = y.size(0), in = y.size(1), out = out_features;
  TORCH_CHECK(in > 0 && out > 0, "packed_ternary_linear: empty weight");
  TORCH_CHECK(packed.numel() == (in * out + 3) / 4, "packed_ternary_linear: ", packed.numel(),
              " bytes do not hold a ", out, " x ", in, " ternary matrix");
  const float* bias_p = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "packed_ternary_linear: bias must be a contiguous float32 tensor of ", out, " values");
    bias_p = bias->data_ptr<float>();
  }
  at::Tensor result = at::empty({n_rows, out}, y.options());
  if (n_rows == 0) return result;
  const float g = *gamma.data_ptr<float>();  // not item(): one dispatch less per call
  const float* yp = y.data_ptr<float>();
  float* op = result.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint8_t* w_end = wp + packed.numel();

  // 1. Per-row int8 codes, as BitLinear: s = max(max|y|, 1e-5) / q_max; code = round(y / s) (half to even);
  // the output scale is s * gamma. A row with a non-finite value gives NaN outputs, as the float reference does.
  std::vector<int8_t> codes(n_rows * in);
  std::vector<float> row_scale(n_rows);
  std::vector<int32_t> row_sum(n_rows);
  std::vector<uint8_t> finite(n_rows);
  const float eps = 1e-5f, qm = static_cast<float>(q_max);
  at::parallel_for(0, n_rows, std::max<int64_t>(1, 65536 / in), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* row = yp + n * in;
      float absmax = 0.f;
      bool ok = true;
      for (int64_t k = 0; k < in; ++k) {
        const float a = std::fabs(row[k]);
        ok = ok && std::isfinite(a);
        absmax = a > absmax ? a : absmax;
      }
      finite[n] = ok;
      const float s = (absmax > eps ? absmax : eps) / qm;
      row_scale[n] = s * g;
      int32_t sum = 0;
      int8_t* c = codes.data() + n * in;
      for (int64_t k = 0; k < in; ++k) {
        float q = ok ? std::nearbyint(row[k] / s) : 0.f;
        q = std::min(std::max(q, -qm - 1.f), qm);
        c[k] = static_cast<int8_t>(q);
        sum += c[k];
      }
      row_sum[n] = sum;
    }
  });

  auto finish = [&](int64_t n, int64_t o, int32_t dot) {  // dot = sum(code * x), code = w + 1
    float v;
    if (!finite[n]) {
      v = std::numeric_limits<float>::quiet_NaN();
    } else {
      v = static_cast<float>(dot - row_sum[n]) * row_scale[n];  // exact integer, then the reference's two roundings
      if (bias_p) v = v + bias_p[o];
    }
    op[n * out + o] = v;
  };

  if (n_rows >= gemm_min_rows) {
    // Many rows (prefill, evaluation batches): unpack a tile of weight rows to float and let BLAS multiply the
    // integer codes; |sum| <= 128 * in < 2^24, so float32 accumulation is exact in any order. The tile bounds the
    // transient memory (GEMM_TILE rows of floats), never a whole float weight.
    float lut[256][4];  // byte -> its 4 weights (code - 1); code 3 never occurs in pack_ternary's bytes
    for (int byte = 0; byte < 256; ++byte) {
      for (int i = 0; i < 4; ++i) lut[byte][i] = static_cast<float>(((byte >> (2 * i)) & 3) - 1);
    }
    at::Tensor xf = at::empty({n_rows, in}, y.options());
    float* xfp = xf.data_ptr<float>();
    for (int64_t k = 0; k < n_rows * in; ++k) xfp[k] = codes[k];
    for (int64_t t0 = 0; t0 < out; t0 += GEMM_TILE) {
      const int64_t t1 = std::min(out, t0 + GEMM_TILE);
      at::Tensor wt = at::empty({t1 - t0, in}, y.options());
      float* wtp = wt.data_ptr<float>();
      at::parallel_for(t0, t1, 16, [&](int64_t o0, int64_t o1) {
        for (int64_t o = o0; o < o1; ++o) {
          float* dst = wtp + (o - t0) * in;
          if (in % 4 == 0) {  // rows start on a byte: one table lookup gives 4 weights
            const uint8_t* src = wp + o * in / 4;
            for (int64_t j = 0; j < in / 4; ++j) std::memcpy(dst + 4 * j, lut[src[j]], 4 * sizeof(float));
          } else {
            for (int64_t k = 0; k < in; ++k) {
              const int64_t e = o * in + k;
              dst[k] = static_cast<float>(static_cast<int>((wp[e >> 2] >> (2 * (e & 3))) & 3) - 1);
            }
          }
        }
      });
      at::Tensor acc = at::mm(xf, wt.t());  // (N, tile): sum(code_x * w) exactly
      const float* ap = acc.data_ptr<float>();
      const int64_t width = t1 - t0;
      at::parallel_for(0, n_rows, 16, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t o = t0; o < t1; ++o) {
            finish(n, o, static_cast<int32_t>(ap[n * width + (o - t0)]) + row_sum[n]);
          }
      });
    }
    return result;
  }

  if (isa == ISA_SCALAR) {
    at::parallel_for(0, out, parallel_grain(in, n_rows), [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        for (int64_t n = 0; n < n_rows; ++n) {
          const int8_t* c = codes.data() + n * in;
          int32_t dot = 0;
          for (int64_t k = 0; k < in; ++k) {
            const int64_t e = o * in + k;
            dot += c[k] * static_cast<int32_t>((wp[e >> 2] >> (2 * (e & 3))) & 3);
          }
          finish(n, o, dot);
        }
      }
    });
    return result;
  }

  const Layout l = make_layout(in, out, isa == ISA_AVX512 ? 64 : 32);
  std::vector<int8_t> xv_storage(l.nshift * n_rows * l.lp + 64);
  int8_t* xv = xv_storage.data();
  permute_codes(codes.data(), n_rows, l, xv);
  const int64_t nblk = l.lp / l.block;
  at::parallel_for(0, out, parallel_grain(in, n_rows), [&](int64_t o0, int64_t o1) {
    int32_t res[16];
    const int8_t* xs[16];
    const uint8_t* ws[4];
    for (int64_t t0 = 0; t0 < n_rows; t0 += X_TILE) {
      const int64_t t1 = std::min(n_rows, t0 + X_TILE);
      // Decoding (1-2 rows): 4 weight rows per call; more activation rows already give independent chains.
      const int ro_pref = t1 - t0 <= 2 ? 4 : 2;
      for (int64_t o = o0; o < o1;) {
        const int ro = o1 - o >= ro_pref ? ro_pref : 1;
        for (int64_t n = t0; n < t1; n += 4) {
          const int rn = static_cast<int>(std::min<int64_t>(4, t1 - n));
          for (int i = 0; i < ro; ++i) {
            const int64_t e0 = (o + i) * in;
            ws[i] = wp + (e0 >> 2);
            for (int r = 0; r < rn; ++r) xs[i * rn + r] = xv + ((e0 & 3) * n_rows + n + r) * l.lp;
          }
          pick(isa, ro, rn)(ws, w_end, xs, nblk, res);
          for (int i = 0; i < ro; ++i) {
            for (int r = 0; r < rn; ++r) finish(n + r, o + i, res[i * rn + r]);
          }
        }
        o += ro;
      }
    }
  });
  return result;
}

// (out, in) int8 ternary weight from pack_ternary's bytes (a transient copy for oneDNN's int8 GEMM).
at::Tensor unpack_int8(const at::Tensor& packed, int64_t out, int64_t in) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 1 &&
                  packed.is_contiguous() && out > 0 && in > 0 && packed.numel() == (in * out + 3) / 4,
              "unpack_int8: packed must be the contiguous uint8 bytes of a ", out, " x ", in, " ternary matrix");
  at::Tensor w = at::empty({out, in}, packed.options().dtype(at::kChar));
  const uint8_t* src = packed.data_ptr<uint8_t>();
  int8_t* dst = w.data_ptr<int8_t>();
  int8_t lut[256][4];
  for (int byte = 0; byte < 256; ++byte) {
    for (int i = 0; i < 4; ++i) lut[byte][i] = static_cast<int8_t>(((byte >> (2 * i)) & 3) - 1);
  }
  const int64_t full = in * out / 4;
  at::parallel_for(0, full, 16384, [&](int64_t b0, int64_t b1) {
    for (int64_t j = b0; j < b1; ++j) std::memcpy(dst + 4 * j, lut[src[j]], 4);
  });
  for (int64_t e = 4 * full; e < in * out; ++e) dst[e] = lut[src[e >> 2]][e & 3];
  return w;
}

std::vector<int64_t> supported_isas() {
  std::vector<int64_t> isas;
  for (int64_t isa : {ISA_AVX512, ISA_AVX2, ISA_SCALAR})
    if (cpu_has(isa)) isas.push_back(isa);
  return isas;
}

}  // namespace

TORCH_LIBRARY(bitmar_packed, m) {
  m.def("linear(Tensor y, Tensor packed, int out_features, Tensor gamma, Tensor? bias, int q_max, int isa, "
        "int gemm_min_rows) -> Tensor",
        &packed_ternary_linear);
  m.def("unpack_int8(Tensor packed, int out_features, int in_features) -> Tensor", &unpack_int8);
  m.def("supported_isas() -> int[]", &supported_isas);
}
"""
