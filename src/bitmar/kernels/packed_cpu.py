"""Packed ternary CPU kernel: BitLinear's eval product computed straight from 2-bit packed weights.

`packed_ternary_linear(y, packed, out_features, gamma, bias, q_max)` quantizes the (already normalised) float32
activations y (N, in) to int8 per row exactly as BitLinear does (s = max(max|y|, 1e-5) / q_max, codes round(y / s),
half to even), multiplies them with the ternary weights read from `pack_ternary`'s bytes (row-major, 4 codes per
byte, code = w + 1) in exact integer arithmetic, and returns acc * (s * gamma) + bias with the reference's roundings:
the same bits as `BitLinear` eval, without a float (or int8) copy of the weight. The 2-bit codes are unpacked in
registers (shift + mask) and multiplied by AVX-512 VNNI (`vpdpbusd`) or AVX2 (`vpmaddubsw`) instructions; a scalar
loop is the portable path. Rows >= `PACKED_GEMM_MIN_ROWS` (prefill, evaluation batches) unpack a 256-row tile of
the weight at a time to float32 and use BLAS (exact: integer sums stay below 2^24), so transient memory is bounded.

Build: the C++ source below is compiled once per machine at first use with `torch.utils.cpp_extension`
(g++/clang and ninja; `pip install -r requirements.txt` installs ninja) into `$TORCH_EXTENSIONS_DIR` or
`~/.cache/bitmar/kernels` (`$XDG_CACHE_HOME/bitmar/kernels`), keyed by a hash of the source, flags, torch and
Python version; later processes load the cached library without compiling. Where it cannot build (no compiler, no
ninja, unwritable cache), PackedBitLinear falls back to its exact pure-torch path and one warning line says why.

Route (decided once per process, at first use): `BITMAR_PACKED_KERNEL=auto|on|off` (default auto: every ISA the CPU
and compiler support is first checked bit for bit against the pure-torch reference, then the fastest is timed
against the pure-torch float route at decoding shapes, ~0.1 s; on: the kernel without measuring; off: pure torch)
and `BITMAR_PACKED_ISA=auto|avx512|avx2|scalar` (force one instruction set, e.g. to test the AVX2 path on an
AVX-512 machine). `set_packed_kernel` / `packed_kernel_mode` override both in code; `packed_kernel_decision()` says
what was chosen and why, and the decision is logged once (logger `bitmar.kernels`).

This file holds no `bitmar` imports: the Hugging Face export flattens it into the remote code, so an exported model
builds and uses the same kernel where a compiler exists and runs the pure-torch path where none does.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PACKED_KERNEL_ENV = "BITMAR_PACKED_KERNEL"  # auto (default: checked and measured) | on | off
PACKED_ISA_ENV = "BITMAR_PACKED_ISA"  # auto (default: fastest exact) | avx512 | avx2 | scalar
PACKED_KERNEL_MODES = ("auto", "on", "off")
PACKED_ISAS = ("avx512", "avx2", "scalar")  # widest first; avx512 means AVX-512 F+BW+VNNI
_PACKED_ISA_CODES = {"scalar": 0, "avx2": 1, "avx512": 2}  # the C++ side's numbering
# From this many rows a call unpacks weight tiles for BLAS instead of the register kernel (measured on a 2-core
# Xeon: the register kernel was faster at every size up to 1024 rows, the tiles at most tie from there on).
PACKED_GEMM_MIN_ROWS = 1024
# The probe: decoding shapes (one sequence and a batch of 8 through a 768 -> 2048 layer), alternating candidates.
PACKED_PROBE_SHAPE = (768, 2048)
PACKED_PROBE_ROWS = (1, 8)
PACKED_PROBE_REPEATS = 5
PACKED_PROBE_BUDGET_S = 0.3
_PACKED_CFLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-fopenmp")  # no FMA contraction: exact roundings
_PACKED_LDFLAGS = ("-fopenmp",)  # torch's own libgomp (same soname): at::parallel_for follows torch.set_num_threads

_PACKED_STALE_LOCK_S = 600  # a build takes ~20-35 s; a lock this old belongs to a dead process

_packed_log = logging.getLogger("bitmar.kernels")

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

_PACKED: dict[str, Any] = {
    "mode": None,  # set_packed_kernel; None: the environment variables
    "isa": None,
    "loaded": None,  # None: not tried yet; True / False after the first attempt
    "load_error": "",
    "library": "",
    "decision": None,
    "use": None,  # the decision's verdict for the current settings
    "isa_code": 0,
    "probe": None,
    "logged": False,
    "op": None,  # torch.ops.bitmar_packed.linear.default once loaded
}


def packed_kernel_cache_dir() -> Path:
    """Where the compiled kernel lives: $TORCH_EXTENSIONS_DIR, else $XDG_CACHE_HOME/bitmar/kernels (~/.cache)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "bitmar" / "kernels"


def _packed_build_name() -> str:
    key = "\n".join([PACKED_KERNEL_CPP, *_PACKED_CFLAGS, *_PACKED_LDFLAGS, torch.__version__, sys.version])
    return "bitmar_packed_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _packed_compile(build_dir: Path, name: str) -> None:
    """Compile with torch.utils.cpp_extension (imported here: it needs setuptools, which a deployment may lack)."""
    from torch.utils import cpp_extension

    lock = build_dir / "lock"  # torch's build lock: one left by a process killed mid-build would block forever
    if lock.exists() and time.time() - lock.stat().st_mtime > _PACKED_STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    source = build_dir / "bitmar_packed.cpp"
    if not source.is_file() or source.read_text() != PACKED_KERNEL_CPP:
        tmp = build_dir / f".bitmar_packed.{os.getpid()}.cpp"  # atomic: a concurrent build never reads half a file
        tmp.write_text(PACKED_KERNEL_CPP)
        os.replace(tmp, source)
    # ninja from `pip install ninja` sits next to this interpreter even when the environment is not activated
    scripts = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", "")
    if scripts and scripts not in path.split(os.pathsep):
        os.environ["PATH"] = path + os.pathsep + scripts if path else scripts
    cpp_extension.load(
        name,
        [str(source)],
        extra_cflags=list(_PACKED_CFLAGS),
        extra_ldflags=list(_PACKED_LDFLAGS),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )


def _packed_registered() -> bool:
    try:
        torch.ops.bitmar_packed.supported_isas  # noqa: B018 - raises when no library registered the operator
    except (AttributeError, RuntimeError):
        return False
    return True


def packed_kernel_available() -> bool:
    """Whether the compiled kernel is loaded in this process (building or loading it on the first call).

    A failure (no compiler, no ninja, unwritable cache) is remembered with its reason (`packed_kernel_decision()`)
    and logged once; it never raises: PackedBitLinear then runs its pure-torch path.
    """
    state = _PACKED
    if state["loaded"] is None:
        state["loaded"] = False
        name = _packed_build_name()
        build_dir = packed_kernel_cache_dir() / name
        library = build_dir / f"{name}.so"
        marker = build_dir / "built.ok"  # written after a complete build: a half-linked library is never loaded
        try:
            if _packed_registered():  # loaded already (the package and an exported model in one process)
                pass
            elif not (marker.is_file() and library.is_file()):
                build_dir.mkdir(parents=True, exist_ok=True)
                _packed_compile(build_dir, name)
                marker.write_text(name + "\n")
            else:
                torch.ops.load_library(str(library))
            torch.ops.bitmar_packed.supported_isas()  # the library registered its operators
            state["loaded"], state["library"] = True, str(library)
            state["op"] = torch.ops.bitmar_packed.linear.default  # resolved once: decoding calls it per layer
        except Exception as err:  # noqa: BLE001 - any build/load failure means "use the pure-torch path"
            lines = [line for line in str(err).splitlines() if line.strip()]
            state["load_error"] = f"{type(err).__name__}: {lines[0][:300] if lines else ''}"
    return bool(state["loaded"])


def _packed_parse(value: str | None, allowed: tuple[str, ...], what: str, meaning: str) -> str | None:
    if value is None or not str(value).strip():
        return None
    choice = str(value).strip().lower()
    if choice not in allowed:
        raise ValueError(f"{what}={value!r} is not one of {', '.join(allowed)}: {meaning}")
    return choice


_PACKED_MODE_MEANING = (
    "auto checks the packed CPU kernel bit for bit and measures it against pure torch (the default), on uses it "
    "without measuring, off always takes the pure-torch path (same results either way)"
)
_PACKED_ISA_MEANING = "auto takes the fastest exact one the CPU supports; the others force one instruction set"


def set_packed_kernel(mode: bool | str | None, isa: str | None = None) -> None:
    """Choose PackedBitLinear's CPU route: "auto"/True (default), "on", "off"/False, None (environment again);
    `isa`: "auto", "avx512", "avx2", "scalar" or None (environment). Overrides BITMAR_PACKED_KERNEL / _ISA."""
    if isinstance(mode, bool):
        mode = "auto" if mode else "off"
    _PACKED["mode"] = _packed_parse(mode, PACKED_KERNEL_MODES, "set_packed_kernel", _PACKED_MODE_MEANING)
    _PACKED["isa"] = _packed_parse(isa, ("auto", *PACKED_ISAS), "set_packed_kernel isa", _PACKED_ISA_MEANING)
    _PACKED["decision"] = _PACKED["use"] = None  # decided again at the next use (the probe is kept)


@contextlib.contextmanager
def packed_kernel_mode(mode: bool | str | None, isa: str | None = None) -> Iterator[None]:
    """`set_packed_kernel(mode, isa)` inside the block; the previous settings afterwards."""
    saved = (_PACKED["mode"], _PACKED["isa"])
    set_packed_kernel(mode, isa)
    try:
        yield
    finally:
        _PACKED["mode"], _PACKED["isa"] = saved
        _PACKED["decision"] = _PACKED["use"] = None


def _packed_settings() -> tuple[str, str, str]:
    """(mode, isa, where they came from); malformed environment values raise ValueError naming the choices."""
    if _PACKED["mode"] is not None or _PACKED["isa"] is not None:
        source = "set_packed_kernel"
    else:
        source = "environment" if os.environ.get(PACKED_KERNEL_ENV) or os.environ.get(PACKED_ISA_ENV) else "default"
    mode = _PACKED["mode"] or _packed_parse(
        os.environ.get(PACKED_KERNEL_ENV), PACKED_KERNEL_MODES, PACKED_KERNEL_ENV, _PACKED_MODE_MEANING
    )
    isa = _PACKED["isa"] or _packed_parse(
        os.environ.get(PACKED_ISA_ENV), ("auto", *PACKED_ISAS), PACKED_ISA_ENV, _PACKED_ISA_MEANING
    )
    return mode or "auto", isa or "auto", source


def packed_supported_isas() -> list[str]:
    """Instruction sets of the kernel this CPU and compiler support, widest first ([] when the kernel is not built)."""
    if not packed_kernel_available():
        return []
    codes = set(torch.ops.bitmar_packed.supported_isas())
    return [isa for isa in PACKED_ISAS if _PACKED_ISA_CODES[isa] in codes]


def _packed_unpack(packed: Tensor, out_features: int, in_features: int) -> Tensor:  # -> (out, in) float32 in {-1,0,1}
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    codes = ((packed.unsqueeze(1) >> shifts) & 3).reshape(-1)[: out_features * in_features]
    return codes.view(out_features, in_features).float().sub_(1)


def packed_linear_reference(
    y: Tensor, w_ternary: Tensor, gamma: Tensor, bias: Tensor | None, q_max: int
) -> Tensor:  # (N, in) float32, (out, in) float32 ternary -> (N, out) float32
    """The pure-torch product the kernel must reproduce bit for bit (BitLinear eval's ops, float32 GEMM)."""
    scale = y.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-5).div_(q_max)  # (N, 1)
    acc = (y / scale).round_().mm(w_ternary.t())
    acc.mul_(scale * gamma)
    if bias is not None:
        acc.add_(bias)
    return acc


def _packed_call(y: Tensor, packed: Tensor, out_features: int, gamma: Tensor, bias: Tensor | None, q_max: int,
                 isa: int, gemm_min_rows: int = PACKED_GEMM_MIN_ROWS) -> Tensor:  # fmt: skip
    return torch.ops.bitmar_packed.linear(y, packed, out_features, gamma, bias, q_max, isa, gemm_min_rows)


def _packed_self_test(isa: int) -> str | None:
    """None when `isa` reproduces the reference bit for bit on odd shapes (both the register and the GEMM path)."""
    gen = torch.Generator().manual_seed(0)
    for rows, n_in, n_out, with_bias in ((1, 37, 19, True), (5, 130, 67, False), (3, 257, 9, True)):
        y = torch.randn(rows, n_in, generator=gen) * 3
        w = torch.randint(-1, 2, (n_out, n_in), generator=gen)
        packed = _packed_pack(w)
        gamma = torch.rand((), generator=gen) + 0.01
        bias = torch.randn(n_out, generator=gen) if with_bias else None
        ref = packed_linear_reference(y, w.float(), gamma, bias, 127)
        for gemm_rows in (1, 1 << 30):
            out = _packed_call(y, packed, n_out, gamma, bias, 127, isa, gemm_rows)
            if not torch.equal(out, ref):
                diff = float((out - ref).abs().max())
                return f"differs from the pure-torch reference on {rows}x{n_in}->{n_out} (max |diff| {diff:.3g})"
    return None


def _packed_pack(w: Tensor) -> Tensor:  # ternary (any shape) -> pack_ternary's bytes (self-contained for the probe)
    codes = (w.reshape(-1).to(torch.int16) + 1).to(torch.uint8)
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.cat([codes, torch.ones(pad, dtype=torch.uint8)])
    place = torch.tensor([1, 4, 16, 64], dtype=torch.uint8)
    return (codes.view(-1, 4) * place).sum(dim=1, dtype=torch.uint8)


def probe_packed_kernel(candidates: list[str]) -> dict[str, Any]:
    """Time each exact ISA in `candidates` and the pure-torch float route at decoding shapes, alternating.

    Returns {"isa": fastest ISA or None when pure torch is faster, "ms": {candidate: fastest round over
    PACKED_PROBE_ROWS, ms}, "shape", "threads", "seconds"}.
    """
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    n_in, n_out = PACKED_PROBE_SHAPE
    w = torch.randint(-1, 2, (n_out, n_in), generator=gen, dtype=torch.int8)  # int8: small transient memory
    packed, w_float, gamma = _packed_pack(w), w.float(), torch.tensor(0.05)
    inputs = [torch.randn(rows, n_in, generator=gen) for rows in PACKED_PROBE_ROWS]
    fns: dict[str, Any] = {"torch": lambda y: packed_linear_reference(y, w_float, gamma, None, 127)}
    for isa in candidates:
        fns[isa] = lambda y, code=_PACKED_ISA_CODES[isa]: _packed_call(y, packed, n_out, gamma, None, 127, code)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for k in range(PACKED_PROBE_REPEATS + 1):  # round 0 is a warm-up
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for y in inputs:
                    fn(y)
                if k:
                    times[name].append(time.perf_counter() - t0)
            if k and time.perf_counter() - start > PACKED_PROBE_BUDGET_S:
                break
    # the fastest call: background load only adds time, and it must not decide (on a busy 2-core machine a median
    # picked pure torch because the other processes' bursts happened to hit the kernel's turns)
    ms = {name: round(min(t) * 1e3, 4) for name, t in times.items()}
    best = min(candidates, key=lambda isa: ms[isa]) if candidates else None
    return {
        "isa": best if best is not None and ms[best] < ms["torch"] else None,
        "ms": ms,
        "shape": f"{'/'.join(map(str, PACKED_PROBE_ROWS))} rows x {n_in}->{n_out}",
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 4),
    }


def packed_kernel_decision() -> dict[str, Any]:
    """Whether PackedBitLinear uses the packed kernel on CPU, with which ISA, and why (deciding now if needed).

    Returns {"use", "isa", "reason", "mode", "isa_setting", "source", "available", "load_error", "library",
    "supported_isas", "excluded" ({isa: why}), "probe"}. Raises ValueError for malformed switches and
    RuntimeError when BITMAR_PACKED_KERNEL=on but the kernel cannot be built or the forced ISA is unsupported.
    """
    state = _PACKED
    if state["decision"] is not None:
        return dict(state["decision"])
    mode, isa_setting, source = _packed_settings()
    available = mode != "off" and packed_kernel_available()
    supported = packed_supported_isas() if available else []
    excluded: dict[str, str] = {}
    probe = None
    isa: str | None = None
    if mode == "off":
        reason = f"packed kernel switched off ({source})"
    elif not available:
        reason = f"packed kernel not built ({state['load_error']})"
        if mode == "on":
            raise RuntimeError(f"{PACKED_KERNEL_ENV}=on but the packed CPU kernel could not be built: {reason}")
    else:
        wanted = list(supported) if isa_setting == "auto" else [isa_setting]
        if isa_setting != "auto" and isa_setting not in supported:
            raise ValueError(
                f"{PACKED_ISA_ENV}={isa_setting} is not supported by this CPU or compiler (supported: "
                f"{', '.join(supported)}); choose one of those or auto"
            )
        if mode == "on":
            isa = wanted[0]
            reason = f"packed kernel forced on ({source}), {isa}, not measured"
        else:
            for name in wanted:
                why = _packed_self_test(_PACKED_ISA_CODES[name])
                if why is not None:
                    excluded[name] = why
            exact = [name for name in wanted if name not in excluded]
            # the scalar loop only stands in for a missing vector ISA (or when forced): never timed against one
            timed = [name for name in exact if name != "scalar"] or exact
            if not timed:
                reason = "no exact packed kernel on this CPU: " + "; ".join(f"{k}: {v}" for k, v in excluded.items())
            else:
                if state["probe"] is None or state["probe"]["candidates"] != timed:
                    state["probe"] = {**probe_packed_kernel(timed), "candidates": timed}
                probe = state["probe"]
                isa = probe["isa"]
                ms = ", ".join(f"{k} {v:.3g} ms" for k, v in probe["ms"].items())
                reason = f"measured {ms} per {probe['shape']} ({probe['threads']} thread(s)): " + (
                    f"{isa} is the fastest" if isa else "pure torch is faster"
                )
    state["use"] = isa is not None
    state["isa_code"] = _PACKED_ISA_CODES[isa] if isa else 0
    state["decision"] = {
        "use": isa is not None,
        "isa": isa,
        "reason": reason,
        "mode": mode,
        "isa_setting": isa_setting,
        "source": source,
        "available": available,
        "load_error": state["load_error"],
        "library": state["library"],
        "supported_isas": supported,
        "excluded": excluded,
        "probe": dict(probe) if probe else None,
    }
    if not state["logged"]:  # one line per process
        state["logged"] = True
        level = logging.WARNING if mode != "off" and not isa else logging.INFO
        _packed_log.log(level, "%s", describe_packed_kernel())
    return dict(state["decision"])


def describe_packed_kernel() -> str:
    """One line for logs: PackedBitLinear's CPU route, why, and the switches."""
    d = packed_kernel_decision()
    route = (
        f"packed {d['isa']} kernel (2-bit weights, no float copy)" if d["use"] else "pure torch (float weight cache)"
    )
    return (
        f"PackedBitLinear on CPU: {route}; {d['reason']}; {PACKED_KERNEL_ENV}={d['mode']}, "
        f"{PACKED_ISA_ENV}={d['isa_setting']} ({d['source']})"
    )


def use_packed_kernel(device: torch.device) -> bool:
    """Whether a PackedBitLinear call on `device` takes the packed kernel (eager CPU calls only)."""
    if device.type != "cpu":
        return False
    use = _PACKED["use"]
    if use is None:
        if torch.compiler.is_compiling():  # no building or timing inside a trace
            return False
        use = packed_kernel_decision()["use"]
    return bool(use)


def packed_unpack_int8(packed: Tensor, out_features: int, in_features: int) -> Tensor:  # -> (out, in) int8
    """A transient int8 copy of the packed ternary weight (for oneDNN's int8 GEMM on large batches)."""
    return torch.ops.bitmar_packed.unpack_int8(packed, out_features, in_features)


def packed_ternary_linear(
    y: Tensor,  # (N, in) float32 CPU: the normalised activations, before int8 quantization
    packed: Tensor,  # pack_ternary bytes of the (out, in) ternary weight
    out_features: int,
    gamma: Tensor,  # 0-dim float32 weight scale
    bias: Tensor | None,  # (out,) float32
    q_max: int,
) -> Tensor:  # (N, out) float32
    """BitLinear eval's output from packed weights with the decided ISA (call after `use_packed_kernel` is True)."""
    return _PACKED["op"](y.contiguous(), packed, out_features, gamma, bias, q_max, _PACKED["isa_code"],
                         PACKED_GEMM_MIN_ROWS)  # fmt: skip
