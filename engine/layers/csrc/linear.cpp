// y = x @ w.T for a few bfloat16 rows x [m, n_in] and a bfloat16 weight w [n_out, n_in], fp32 accumulation.
//
// A decode step's linear layers multiply a handful of rows by each weight once, so their time is the time
// to stream the weights from memory. Each 4-row block of w is loaded once into registers and multiplied by
// every row of x with AVX512-BF16 dot products (vdpbf16ps: 32 products per instruction); the 4x4 partial
// sums are reduced horizontally together and rounded to bfloat16 once. About twice oneDNN's speed for 1 to
// 16 rows on this project's 2-core EPYC test machine (docs/BENCHMARKS.md).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include "simd.h"

#include <cstdint>

namespace {

// The hardware prefetcher alone leaves the 4-row streams idle while a block is multiplied by several rows
// (4 rows ran at 2/3 the speed of 1); asking for the next block's chunk as each chunk is loaded evens that out.
constexpr int64_t PREFETCH_BLOCKS = 1;

// Outputs [o, o + 4) of M rows (M <= 4, a constant after inlining so the accumulators stay in registers).
template <int M>
inline void block(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t n_in, int64_t n_out) {
    __m512 acc[M][4];
#pragma GCC unroll 4
    for (int r = 0; r < M; r++)
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < n_in; c += 32) {
        __m512bh v[4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            _mm_prefetch(reinterpret_cast<const char*>(w + (PREFETCH_BLOCKS * 4 + j) * n_in + c), _MM_HINT_T0);
            v[j] = (__m512bh)_mm512_loadu_si512(w + j * n_in + c);
        }
#pragma GCC unroll 4
        for (int r = 0; r < M; r++) {
            __m512bh xr = (__m512bh)_mm512_loadu_si512(x + r * n_in + c);
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], v[j], xr);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < M; r++) {
        __m128bh out = _mm_cvtneps_pbh(hogwild::reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(y + r * n_out), (__m128i)out);
    }
}

void rows(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t m, int64_t n_in, int64_t n_out,
          int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; o += 4) {
        const uint16_t* wo = w + o * n_in;
        for (int64_t r = 0; r < m; r += 4) {  // further rows reread the block from L1
            const uint16_t* xr = x + r * n_in;
            uint16_t* yr = y + r * n_out + o;
            switch (m - r) {
                case 1: block<1>(xr, wo, yr, n_in, n_out); break;
                case 2: block<2>(xr, wo, yr, n_in, n_out); break;
                case 3: block<3>(xr, wo, yr, n_in, n_out); break;
                default: block<4>(xr, wo, yr, n_in, n_out); break;
            }
        }
    }
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bfloat16 only");
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [m, k] and w [n, k]");
    TORCH_CHECK(w.size(1) % 32 == 0 && w.size(0) % 4 == 0 && w.is_contiguous(), "w: contiguous, k % 32, n % 4");
    at::Tensor xc = x.contiguous();
    const int64_t m = xc.size(0), n_in = xc.size(1), n_out = w.size(0);
    at::Tensor y = at::empty({m, n_out}, xc.options());
    auto xp = static_cast<const uint16_t*>(xc.const_data_ptr());
    auto wp = static_cast<const uint16_t*>(w.const_data_ptr());
    auto yp = static_cast<uint16_t*>(y.mutable_data_ptr());
    at::parallel_for(0, n_out / 4, 64, [&](int64_t begin, int64_t end) {
        rows(xp, wp, yp, m, n_in, n_out, 4 * begin, 4 * end);
    });
    return y;
}

}  // namespace

TORCH_LIBRARY(hogwild_cpu, lib) { lib.def("linear_bf16(Tensor x, Tensor w) -> Tensor", linear_bf16); }
