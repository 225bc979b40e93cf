// The small ops between a layer's matmuls (engine/layers/ops.py) in one pass each: RMSNorm (after the
// residual add), SiLU x up, and the q/k/v projection's epilogue (q/k norms, RoPE, the new keys and values
// written to their pool slots).
//
// As torch ops they are about fifty dispatches per layer, a few microseconds each, on rows of a few hundred
// elements: some 15% of a CPU decode step of the default model. Values round to the model's dtype where the
// torch ops round (after the residual add, after the norm and again after its weight, after SiLU, after each
// RoPE product and their sum), so in bfloat16 the results match torch's bit for bit up to the order of the
// float32 sums. The other kernels are built with -ffast-math; these must not be: it turns a division by an
// overflowed exp (SiLU of a large negative gate) into an approximate reciprocal that gives NaN, and infinities
// and NaNs must propagate as torch's do.
#pragma GCC optimize("no-fast-math")
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t GRAIN = 16;  // rows per parallel task: prefill chunks split across threads, decode does not

// x rounded to T (to nearest even, as torch's casts), kept in float.
template <typename T>
inline float rounded(float x) {
    return static_cast<float>(static_cast<T>(x));
}

// 1 / sqrt(mean(v^2) + eps), summed in 16 lanes: without -ffast-math the compiler keeps a single running sum
// serial, and this order is as good as any (torch's own differs).
inline float inverse_rms(const float* v, int64_t n, float eps) {
    constexpr int64_t LANES = 16;
    float lanes[LANES] = {};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int64_t j = 0; j < LANES; j++) lanes[j] += v[i + j] * v[i + j];
    for (; i < n; i++) lanes[0] += v[i] * v[i];
    float squares = 0.f;
    for (float lane : lanes) squares += lane;
    return 1.f / std::sqrt(squares / static_cast<float>(n) + eps);
}

// Runs f<T> for the tensor's dtype (float32, bfloat16, float16).
template <template <typename> class F, typename... Args>
auto by_dtype(at::ScalarType dtype, Args&&... args) {
    switch (dtype) {
        case at::kFloat: return F<float>::run(std::forward<Args>(args)...);
        case at::kBFloat16: return F<c10::BFloat16>::run(std::forward<Args>(args)...);
        case at::kHalf: return F<c10::Half>::run(std::forward<Args>(args)...);
        default: TORCH_CHECK(false, "float32, bfloat16 or float16 only");
    }
}

// out = weight * rmsnorm(x [+ residual]); sum = x + residual when there is one.
template <typename T>
struct Norm {
    static void run(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, double eps,
                    const at::Tensor& out, const at::Tensor* sum) {
        const int64_t width = x.size(-1), rows = x.numel() / width;
        const T* xp = x.const_data_ptr<T>();
        const T* rp = residual ? residual->const_data_ptr<T>() : nullptr;
        const T* wp = weight.const_data_ptr<T>();
        T* op = out.mutable_data_ptr<T>();
        T* sp = sum ? sum->mutable_data_ptr<T>() : nullptr;
        at::parallel_for(0, rows, GRAIN, [&](int64_t begin, int64_t end) {
            std::vector<float> v(width);
            for (int64_t r = begin; r < end; r++) {
                const int64_t base = r * width;
                for (int64_t i = 0; i < width; i++) {
                    float value = static_cast<float>(xp[base + i]);
                    if (rp) {
                        value = rounded<T>(value + static_cast<float>(rp[base + i]));
                        sp[base + i] = static_cast<T>(value);
                    }
                    v[i] = value;
                }
                const float scale = inverse_rms(v.data(), width, static_cast<float>(eps));
                for (int64_t i = 0; i < width; i++)
                    op[base + i] = static_cast<T>(static_cast<float>(wp[i]) * rounded<T>(v[i] * scale));
            }
        });
    }
};

void check_norm(const at::Tensor& x, const at::Tensor& weight) {
    TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight of one dtype");
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.is_contiguous(), "weight [width]");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
    check_norm(x, weight);
    at::Tensor xc = x.contiguous(), out = at::empty_like(xc);
    by_dtype<Norm>(x.scalar_type(), xc, nullptr, weight, eps, out, nullptr);
    return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
    check_norm(x, weight);
    TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(), "residual like x");
    at::Tensor xc = x.contiguous(), rc = residual.contiguous();
    at::Tensor out = at::empty_like(xc), sum = at::empty_like(xc);
    by_dtype<Norm>(x.scalar_type(), xc, &rc, weight, eps, out, &sum);
    return {out, sum};
}

// out = silu(gate) * up, where gate_up = [gate | up].
template <typename T>
struct SiluMul {
    static void run(const at::Tensor& gate_up, const at::Tensor& out) {
        const int64_t width = out.size(1), rows = out.size(0);
        const T* gp = gate_up.const_data_ptr<T>();
        T* op = out.mutable_data_ptr<T>();
        at::parallel_for(0, rows, GRAIN, [&](int64_t begin, int64_t end) {
            for (int64_t r = begin; r < end; r++) {
                const T* gate = gp + r * 2 * width;
                for (int64_t i = 0; i < width; i++) {
                    const float g = static_cast<float>(gate[i]);
                    const float act = rounded<T>(g / (1.f + std::exp(-g)));
                    op[r * width + i] = static_cast<T>(act * static_cast<float>(gate[width + i]));
                }
            }
        });
    }
};

at::Tensor silu_mul(const at::Tensor& gate_up) {
    TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up [rows, 2 * width]");
    at::Tensor gc = gate_up.contiguous();
    at::Tensor out = at::empty({gc.size(0), gc.size(1) / 2}, gc.options());
    by_dtype<SiluMul>(gc.scalar_type(), gc, out);
    return out;
}

// One head of one token: its RMSNorm (with a weight: Qwen3's q/k norms) and rotate(): x * cos +
// rotate_half(x) * sin, written to dst.
template <typename T>
void norm_rope(const T* src, const T* norm, float eps, const T* cos, const T* sin, T* dst, int64_t dim,
               float* v) {
    for (int64_t i = 0; i < dim; i++) v[i] = static_cast<float>(src[i]);
    if (norm) {
        const float scale = inverse_rms(v, dim, eps);
        for (int64_t i = 0; i < dim; i++) v[i] = rounded<T>(static_cast<float>(norm[i]) * rounded<T>(v[i] * scale));
    }
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < dim; i++) {
        const float partner = i < half ? -v[i + half] : v[i - half];
        const float a = rounded<T>(v[i] * static_cast<float>(cos[i]));
        const float b = rounded<T>(partner * static_cast<float>(sin[i]));
        dst[i] = static_cast<T>(a + b);
    }
}

struct Epilogue {
    const at::Tensor &qkv, &q_cos, &q_sin, &k_cos, &k_sin, &slots, &k_pool, &v_pool, &q;
    const at::Tensor *q_norm, *k_norm;
    double eps;
    int64_t heads, kv_heads, dim;
};

template <typename T>
struct QkvEpilogue {
    static void run(const Epilogue& e) {
        const int64_t rows = e.qkv.size(0), width = e.qkv.size(1), h = e.heads, kv = e.kv_heads, d = e.dim;
        const T* src = e.qkv.const_data_ptr<T>();
        const T* qn = e.q_norm ? e.q_norm->const_data_ptr<T>() : nullptr;
        const T* kn = e.k_norm ? e.k_norm->const_data_ptr<T>() : nullptr;
        const T *qc = e.q_cos.const_data_ptr<T>(), *qs = e.q_sin.const_data_ptr<T>();
        const T *kc = e.k_cos.const_data_ptr<T>(), *ks = e.k_sin.const_data_ptr<T>();
        const int64_t* slot = e.slots.const_data_ptr<int64_t>();
        T* qp = e.q.mutable_data_ptr<T>();
        T* kp = e.k_pool.mutable_data_ptr<T>();
        T* vp = e.v_pool.mutable_data_ptr<T>();
        const int64_t slot_stride = e.k_pool.stride(0), head_stride = e.k_pool.stride(1);
        const float eps = static_cast<float>(e.eps);
        at::parallel_for(0, rows, GRAIN, [&](int64_t begin, int64_t end) {
            std::vector<float> v(d);
            for (int64_t t = begin; t < end; t++) {
                const T* row = src + t * width;
                const int64_t pos = t * d, base = slot[t] * slot_stride;
                for (int64_t i = 0; i < h; i++)
                    norm_rope(row + i * d, qn, eps, qc + pos, qs + pos, qp + (t * h + i) * d, d, v.data());
                for (int64_t i = 0; i < kv; i++) {
                    norm_rope(row + (h + i) * d, kn, eps, kc + pos, ks + pos, kp + base + i * head_stride, d,
                              v.data());
                    const T* value = row + (h + kv + i) * d;
                    T* out = vp + base + i * head_stride;
                    for (int64_t j = 0; j < d; j++) out[j] = value[j];
                }
            }
        });
    }
};

at::Tensor qkv_epilogue(const at::Tensor& qkv, const std::optional<at::Tensor>& q_norm,
                        const std::optional<at::Tensor>& k_norm, double eps, const at::Tensor& q_cos,
                        const at::Tensor& q_sin, const at::Tensor& k_cos, const at::Tensor& k_sin,
                        const at::Tensor& slots, at::Tensor& k_pool, at::Tensor& v_pool, int64_t heads) {
    const int64_t kv_heads = k_pool.size(1), dim = k_pool.size(2), rows = qkv.size(0);
    TORCH_CHECK(qkv.is_contiguous() && qkv.size(1) == (heads + 2 * kv_heads) * dim, "qkv [rows, (h + 2 kv) d]");
    TORCH_CHECK(k_pool.strides() == v_pool.strides() && k_pool.stride(2) == 1, "k/v pools [slots, kv, d]");
    TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == rows, "slots: int64 [rows]");
    for (const at::Tensor* t : {&q_cos, &q_sin, &k_cos, &k_sin})
        TORCH_CHECK(t->is_contiguous() && t->numel() == rows * dim && t->scalar_type() == qkv.scalar_type(),
                    "cos/sin [rows, 1, d] in the model's dtype");
    at::Tensor q = at::empty({rows, heads, dim}, qkv.options());
    const Epilogue e{qkv,    q_cos, q_sin,  k_cos, k_sin, slots, k_pool, v_pool, q,
                     q_norm ? &*q_norm : nullptr, k_norm ? &*k_norm : nullptr, eps, heads, kv_heads, dim};
    by_dtype<QkvEpilogue>(qkv.scalar_type(), e);
    return q;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hogwild_cpu, lib) {
    lib.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", rms_norm);
    lib.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)", add_rms_norm);
    lib.def("silu_mul(Tensor gate_up) -> Tensor", silu_mul);
    lib.def(
        "qkv_epilogue(Tensor qkv, Tensor? q_norm, Tensor? k_norm, float eps, Tensor q_cos, Tensor q_sin, "
        "Tensor k_cos, Tensor k_sin, Tensor slots, Tensor(a!) k_pool, Tensor(b!) v_pool, int heads) -> Tensor",
        qkv_epilogue);
}
