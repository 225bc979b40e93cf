// Hogwild decode attention over the paged pool on the CPU: the Triton kernel's algorithm and plan
// (engine/layers/kernel_plan.py, engine/layers/triton_attention.py) in C++.
//
// An item is a tile of query tokens and the pieces of keys it attends; for one KV head, the tile's queries
// of that head's GQA group are stacked into rows, each rotated per piece by minus the block's offset in its
// own view and scored against the piece's keys (each key read once for all rows); one softmax covers all the item's pieces (at
// most about two chunks of keys), so a row's many small tail blocks cost one pass, not one each. Partials
// (max, sum, unnormalized output) per (token, head) are merged by log-sum-exp, as in flash-decoding.
//
// Head dims are template constants (C = dim / 16 AVX-512 vectors), so that a key or value row and the
// outputs of a block of query rows stay in registers: a key is scored against four rows at a time
// with one shared horizontal reduction, and a value is added into RB rows' outputs held in registers.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

// A finite "minus infinity" for masked scores and empty maxima: exp(NO_SCORE - m) is 0 and never NaN, and
// the kernels are built with -ffast-math (for vectorized exp), which assumes no infinities.
constexpr float NO_SCORE = -1.0e30f;

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return float(x); }

struct Plan {
    const int32_t *key_slots, *piece_start, *piece_len, *piece_skip, *piece_rot, *rot_offset, *item_pieces,
        *query_index, *query_pos, *part, *part_start;
    const float *cos, *sin;
    int64_t tile;

    int64_t rot(int32_t piece, int64_t query) const { return piece_rot[piece * tile + query]; }
};

struct Segment {  // the keys of one piece some row of the item sees, and their first column in the scores
    int32_t piece;
    const int32_t* slots;
    int64_t keys, at;
};

struct Scratch {  // per item: the tile's rows of one KV head
    std::vector<float> q, q_rot, out, scores;
    std::vector<uint16_t> q_bf;  // q_rot in bfloat16, for bfloat16 keys
    std::vector<Segment> segments;
    std::vector<float> max, sum;
};

// Keys and values sit at scattered pool slots (a page of 16 is contiguous): ask for rows a few keys ahead.
constexpr int64_t PREFETCH_KEYS = 8;

template <typename T, int D>
inline void prefetch_row(const T* row) {
#pragma GCC unroll 8
    for (int b = 0; b < int(D * sizeof(T)); b += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T0);
}

// scores[r * stride] = dot(r) for every row; four rows at a time share one horizontal reduction.
template <typename Dot>
inline void store_scores(int64_t rows, float* scores, int64_t stride, Dot dot) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        alignas(16) float four[4];
        _mm_store_ps(four, hogwild::reduce4(dot(r), dot(r + 1), dot(r + 2), dot(r + 3)));
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) scores[(r + j) * stride] = four[j];
    }
    for (; r < rows; r++) scores[r * stride] = _mm512_reduce_add_ps(dot(r));
}

// Scores of one key for every row: scores[r * stride] = q_rot[r] . key.
template <int C, typename T>
inline void score_key(const T* key, const float* q_rot, int64_t rows, float* scores, int64_t stride) {
    constexpr int D = 16 * C;
    __m512 k[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; c++) k[c] = hogwild::load16(key + 16 * c);
    store_scores(rows, scores, stride, [&](int64_t r) {
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q_rot + r * D), k[0]);
#pragma GCC unroll 16
        for (int c = 1; c < C; c++) a = _mm512_fmadd_ps(_mm512_loadu_ps(q_rot + r * D + 16 * c), k[c], a);
        return a;
    });
}

// The same for bfloat16 keys and queries rounded to bfloat16 (as the Triton kernel's dot does): vdpbf16ps
// multiplies 32 pairs per instruction exactly into float32 sums, and the key needs no conversion.
template <int C>
inline void score_key_bf16(const c10::BFloat16* key, const uint16_t* q_bf, int64_t rows, float* scores,
                           int64_t stride) {
    constexpr int D = 16 * C, H = C / 2;
    __m512bh k[H];
#pragma GCC unroll 8
    for (int h = 0; h < H; h++) k[h] = (__m512bh)_mm512_loadu_si512(key + 32 * h);
    store_scores(rows, scores, stride, [&](int64_t r) {
        __m512 a = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int h = 0; h < H; h++) a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(q_bf + r * D + 32 * h), k[h]);
        return a;
    });
}

// out[r] = sum over the item's segments and their keys n of probs[r * width + at + n] * value_n, for RB
// rows whose outputs stay in registers across all the item's pieces.
template <int C, int RB, typename T>
inline void add_values(const T* v, const std::vector<Segment>& segments, int64_t stride, const float* probs,
                       int64_t width, float* out) {
    constexpr int D = 16 * C;
    __m512 acc[RB][C];
#pragma GCC unroll 4
    for (int j = 0; j < RB; j++)
#pragma GCC unroll 16
        for (int c = 0; c < C; c++) acc[j][c] = _mm512_setzero_ps();
    for (const Segment& seg : segments) {
        for (int64_t n = 0; n < seg.keys; n++) {
            if (n + PREFETCH_KEYS < seg.keys) prefetch_row<T, D>(v + int64_t(seg.slots[n + PREFETCH_KEYS]) * stride);
            const T* row = v + int64_t(seg.slots[n]) * stride;
            __m512 val[C];
#pragma GCC unroll 16
            for (int c = 0; c < C; c++) val[c] = hogwild::load16(row + 16 * c);
#pragma GCC unroll 4
            for (int j = 0; j < RB; j++) {
                const __m512 w = _mm512_set1_ps(probs[j * width + seg.at + n]);
#pragma GCC unroll 16
                for (int c = 0; c < C; c++) acc[j][c] = _mm512_fmadd_ps(w, val[c], acc[j][c]);
            }
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < RB; j++)
#pragma GCC unroll 16
        for (int c = 0; c < C; c++) _mm512_storeu_ps(out + j * D + 16 * c, acc[j][c]);
}

template <int C, typename T>
void attend_item(const T* q, const T* k, const T* v, const Plan& p, int64_t item, int64_t kv_head,
                 int64_t group, int64_t q_stride_t, int64_t q_stride_h, int64_t pool_stride_s,
                 int64_t pool_stride_h, float scale, float* part_max, float* part_sum, float* part_out,
                 int64_t heads, Scratch& s) {
    constexpr int D = 16 * C;
    constexpr int RB = C <= 4 ? 4 : C <= 8 ? 2 : 1;  // rows whose outputs fit in registers with a value
    static_assert(RB == 4 || RB == 2 || RB == 1, "the leftover rows below are at most one pair and one single");
    constexpr bool BF16_DOT = std::is_same_v<T, c10::BFloat16> && C % 2 == 0;  // 32-element vdpbf16ps chunks
    // Rows are (query of the tile, head of the group), queries with no token (-1) left out.
    std::vector<int64_t> row_query;
    for (int64_t i = 0; i < p.tile; i++)
        if (p.query_index[item * p.tile + i] >= 0)
            for (int64_t g = 0; g < group; g++) row_query.push_back(i);
    const int64_t rows = int64_t(row_query.size());
    if (rows == 0) return;
    s.q.resize(rows * D);
    s.q_rot.resize(rows * D);
    s.out.assign(rows * D, 0.f);
    s.max.assign(rows, NO_SCORE);
    s.sum.assign(rows, 0.f);
    for (int64_t r = 0; r < rows; r++) {
        const int64_t token = p.query_index[item * p.tile + row_query[r]];
        const T* src = q + token * q_stride_t + (kv_head * group + r % group) * q_stride_h;
        for (int d = 0; d < D; d++) s.q[r * D + d] = to_float(src[d]);
    }
    const T* k_head = k + kv_head * pool_stride_h;
    const T* v_head = v + kv_head * pool_stride_h;
    // One softmax over all the item's pieces: scores [rows, width], piece after piece (its visible keys).
    auto limit = [&](int64_t r, int32_t piece) {  // the last key of the piece row r may see
        const int64_t pos = p.query_pos[item * p.tile + row_query[r]];
        const int64_t first = int64_t(p.rot_offset[p.rot(piece, row_query[r])]) + p.piece_skip[piece];
        return std::min<int64_t>(pos - first, p.piece_len[piece] - 1);
    };
    s.segments.clear();
    int64_t width = 0;
    for (int32_t piece = p.item_pieces[item]; piece < p.item_pieces[item + 1]; piece++) {
        int64_t keys = 0;
        for (int64_t r = 0; r < rows; r++) keys = std::max(keys, limit(r, piece) + 1);
        if (keys <= 0) continue;
        s.segments.push_back({piece, p.key_slots + p.piece_start[piece], keys, width});
        width += keys;
    }
    if (width > 0) {
        s.scores.resize(rows * width);
        for (const Segment& seg : s.segments) {
            // Rotate each query by minus the block's offset in its view (rotate_half's sign folded into sin)
            // and scale.
            for (int64_t r = 0; r < rows; r++) {
                const float* cs = p.cos + p.rot(seg.piece, row_query[r]) * D;
                const float* sn = p.sin + p.rot(seg.piece, row_query[r]) * D;
                const float* x = &s.q[r * D];
                float* y = &s.q_rot[r * D];
                for (int d = 0; d < D / 2; d++) {
                    y[d] = (x[d] * cs[d] + x[d + D / 2] * sn[d]) * scale;
                    y[d + D / 2] = (x[d + D / 2] * cs[d + D / 2] + x[d] * sn[d + D / 2]) * scale;
                }
            }
            if constexpr (BF16_DOT) {
                s.q_bf.resize(rows * D);
                for (int64_t i = 0; i < rows * D; i += 32) {
                    const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(&s.q_rot[i + 16]), _mm512_loadu_ps(&s.q_rot[i]));
                    _mm512_storeu_si512(&s.q_bf[i], (__m512i)pair);
                }
            }
            for (int64_t n = 0; n < seg.keys; n++) {
                const T* key = k_head + int64_t(seg.slots[n]) * pool_stride_s;
                if (n + PREFETCH_KEYS < seg.keys)
                    prefetch_row<T, D>(k_head + int64_t(seg.slots[n + PREFETCH_KEYS]) * pool_stride_s);
                if constexpr (BF16_DOT)
                    score_key_bf16<C>(key, s.q_bf.data(), rows, &s.scores[seg.at + n], width);
                else
                    score_key<C>(key, s.q_rot.data(), rows, &s.scores[seg.at + n], width);
            }
            for (int64_t r = 0; r < rows; r++)  // the keys in this row's future
                for (int64_t n = std::max<int64_t>(limit(r, seg.piece) + 1, 0); n < seg.keys; n++)
                    s.scores[r * width + seg.at + n] = NO_SCORE;
        }
        for (int64_t r = 0; r < rows; r++) {
            float* sc = &s.scores[r * width];
            float m = NO_SCORE;
#pragma omp simd reduction(max : m)
            for (int64_t n = 0; n < width; n++) m = std::max(m, sc[n]);
            float total = 0.f;
#pragma omp simd reduction(+ : total)
            for (int64_t n = 0; n < width; n++) {
                sc[n] = std::exp(sc[n] - m);  // masked keys: exp(NO_SCORE - m) = 0
                total += sc[n];
            }
            s.max[r] = m;
            s.sum[r] = total;
        }
        int64_t r = 0;  // RB rows at a time, then at most one pair and one single (RB is 4, 2 or 1)
        for (; r + RB <= rows; r += RB)
            add_values<C, RB>(v_head, s.segments, pool_stride_s, &s.scores[r * width], width, &s.out[r * D]);
        if (RB > 2 && r + 2 <= rows) {
            add_values<C, 2>(v_head, s.segments, pool_stride_s, &s.scores[r * width], width, &s.out[r * D]);
            r += 2;
        }
        if (r < rows) add_values<C, 1>(v_head, s.segments, pool_stride_s, &s.scores[r * width], width, &s.out[r * D]);
    }
    for (int64_t r = 0; r < rows; r++) {
        const int64_t stat = int64_t(p.part[item * p.tile + row_query[r]]) * heads + kv_head * group + r % group;
        part_max[stat] = s.max[r];
        part_sum[stat] = s.sum[r];
        std::memcpy(part_out + stat * D, &s.out[r * D], D * sizeof(float));
    }
}

template <typename T>
void merge(const int32_t* part_start, const float* part_max, const float* part_sum, const float* part_out,
           T* out, int64_t tokens, int64_t heads, int64_t dim, int64_t out_stride_t, int64_t out_stride_h) {
    at::parallel_for(0, tokens * heads, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> acc(dim);
        for (int64_t row = begin; row < end; row++) {
            const int64_t token = row / heads, head = row % heads;
            float m = NO_SCORE;
            for (int64_t i = part_start[token]; i < part_start[token + 1]; i++)
                m = std::max(m, part_max[i * heads + head]);
            float total = 0.f;
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t i = part_start[token]; i < part_start[token + 1]; i++) {
                const int64_t stat = i * heads + head;
                const float w = std::exp(part_max[stat] - m);
                total += part_sum[stat] * w;
#pragma omp simd
                for (int64_t d = 0; d < dim; d++) acc[d] += w * part_out[stat * dim + d];
            }
            T* o = out + token * out_stride_t + head * out_stride_h;
            const float norm = total > 0.f ? 1.f / total : 0.f;  // tokens of rows left out of the plan: 0
            for (int64_t d = 0; d < dim; d++) o[d] = T(acc[d] * norm);
        }
    });
}

template <int C, typename T>
at::Tensor run(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const Plan& p,
               int64_t items, int64_t tokens, int64_t parts, double scale) {
    const int64_t heads = q.size(1), dim = q.size(2), kv_heads = k_pool.size(1);
    const int64_t group = heads / kv_heads;
    auto f32 = q.options().dtype(at::kFloat);
    at::Tensor part_max = at::empty({parts, heads}, f32);
    at::Tensor part_sum = at::empty({parts, heads}, f32);
    at::Tensor part_out = at::empty({parts, heads, dim}, f32);
    const T* qp = q.const_data_ptr<T>();
    const T* kp = k_pool.const_data_ptr<T>();
    const T* vp = v_pool.const_data_ptr<T>();
    float *pm = part_max.mutable_data_ptr<float>(), *ps = part_sum.mutable_data_ptr<float>(),
          *po = part_out.mutable_data_ptr<float>();
    at::parallel_for(0, items * kv_heads, 1, [&](int64_t begin, int64_t end) {
        Scratch scratch;
        for (int64_t w = begin; w < end; w++)
            attend_item<C>(qp, kp, vp, p, w / kv_heads, w % kv_heads, group, q.stride(0), q.stride(1),
                           k_pool.stride(0), k_pool.stride(1), float(scale), pm, ps, po, heads, scratch);
    });
    at::Tensor out = at::empty_like(q);
    merge(p.part_start, pm, ps, po, out.mutable_data_ptr<T>(), tokens, heads, dim, out.stride(0),
          out.stride(1));
    return out;
}

const int32_t* int_data(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous() && t.device().is_cpu(), name, ": int32, contiguous");
    return t.const_data_ptr<int32_t>();
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                     const at::Tensor& key_slots, const at::Tensor& piece_start, const at::Tensor& piece_len,
                     const at::Tensor& piece_skip, const at::Tensor& piece_rot, const at::Tensor& rot_offset,
                     const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& item_pieces, const at::Tensor& query_index, const at::Tensor& query_pos,
                     const at::Tensor& part, const at::Tensor& part_start, double scale, int64_t parts) {
    TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && k_pool.sizes() == v_pool.sizes(), "q [t, h, d], pools [s, kvh, d]");
    TORCH_CHECK(k_pool.strides() == v_pool.strides() && q.stride(2) == 1 && k_pool.stride(2) == 1, "unit stride in d");
    TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && q.scalar_type() == v_pool.scalar_type(), "one dtype");
    TORCH_CHECK(q.size(1) % k_pool.size(1) == 0 && q.size(2) == k_pool.size(2) && q.size(2) % 2 == 0, "shapes");
    TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous(), "cos/sin float32");
    TORCH_CHECK(piece_rot.dim() == 2 && piece_rot.size(1) == query_index.size(1), "piece_rot [pieces, tile]");
    const Plan p{int_data(key_slots, "key_slots"), int_data(piece_start, "piece_start"),
                 int_data(piece_len, "piece_len"), int_data(piece_skip, "piece_skip"),
                 int_data(piece_rot, "piece_rot"), int_data(rot_offset, "rot_offset"),
                 int_data(item_pieces, "item_pieces"), int_data(query_index, "query_index"),
                 int_data(query_pos, "query_pos"), int_data(part, "part"), int_data(part_start, "part_start"),
                 cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), query_index.size(1)};
    const int64_t items = item_pieces.size(0) - 1, tokens = part_start.size(0) - 1;
    TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
    const bool bf16 = q.scalar_type() == at::kBFloat16;
#define HOGWILD_DIM(C)                                                                           \
    case 16 * C:                                                                                 \
        return bf16 ? run<C, c10::BFloat16>(q, k_pool, v_pool, p, items, tokens, parts, scale) \
                    : run<C, float>(q, k_pool, v_pool, p, items, tokens, parts, scale);
    switch (q.size(2)) {
        HOGWILD_DIM(1)
        HOGWILD_DIM(2)
        HOGWILD_DIM(3)
        HOGWILD_DIM(4)
        HOGWILD_DIM(5)
        HOGWILD_DIM(6)
        HOGWILD_DIM(8)
        HOGWILD_DIM(16)
        default: TORCH_CHECK(false, "head_dim must be one of 16, 32, 48, 64, 80, 96, 128, 256");
    }
#undef HOGWILD_DIM
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hogwild_cpu, lib) {
    lib.def(
        "attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor key_slots, Tensor piece_start, "
        "Tensor piece_len, Tensor piece_skip, Tensor piece_rot, Tensor rot_offset, Tensor cos, Tensor sin, "
        "Tensor item_pieces, Tensor query_index, "
        "Tensor query_pos, Tensor part, Tensor part_start, float scale, int parts) -> Tensor",
        attention);
}
