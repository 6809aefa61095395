// Linear layers for a few rows at a time on AVX-512 CPUs: out[r] = op(x[r] W^T + b, other[r]).
// Built at run time by backend/models/row_kernels.py, which says why they are ours.
//
// A weight is packed once into column blocks of 32 outputs, laid out in the order the loop reads them:
// float32 [N/32][K][32], bfloat16 [N/32][K/2][32][2] (pairs of k for vdpbf16ps). Threads take whole
// column blocks; each block streams its weights once for every 8 rows. Every output is one accumulator
// summed over k in the same order whatever the other rows are: a row's result never depends on its
// neighbours or on how many rows there are (the engine's seeds rely on that; tests check it bit for bit).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <type_traits>

namespace {

constexpr int64_t COLS = 32;    // outputs per column block: two 16-float vectors
constexpr int64_t ROWS = 8;     // rows per pass over a block: 16 accumulators stay in registers
constexpr int64_t AHEAD = 32;   // prefetch distance in k steps: 2-4 KB ahead of the loads

enum Op : int64_t { NONE = 0, SWISH = 1, ADD = 2, MUL = 3 };

// The lanes of a 16-float vector that hold data when `left` values remain (all 16 from 16 on).
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// e^x for the SiLU, to about 1 ulp: 2^n * e^r with |r| <= ln2/2 and a degree-6 Taylor polynomial.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 swish16(__m512 v) {
  return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}

inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 mask) {
  const __m256i half = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline void store16(float* p, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, v); }
inline void store16(at::BFloat16* p, __m512 v, __mmask16 mask) {
  // Round to nearest even, as PyTorch's float -> bfloat16 conversion.
  _mm256_mask_storeu_epi16(p, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

// Accumulators of M rows x 32 outputs for one column block, summed over k in order.
template <int M>
inline void block(const float* x, int64_t ldx, const float* w, int64_t k, __m512 (&a0)[M], __m512 (&a1)[M]) {
  for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(w + (i + AHEAD) * COLS), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + (i + AHEAD) * COLS + 16), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(w + i * COLS);
    const __m512 w1 = _mm512_loadu_ps(w + i * COLS + 16);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * ldx + i]);
      a0[m] = _mm512_fmadd_ps(xv, w0, a0[m]);
      a1[m] = _mm512_fmadd_ps(xv, w1, a1[m]);
    }
  }
}

template <int M>
inline void block(const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t k, __m512 (&a0)[M],
                  __m512 (&a1)[M]) {
  for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
  const int32_t* pairs = reinterpret_cast<const int32_t*>(x);  // k is even: x[m, 2p:2p+2] as one int32
  const int64_t ldp = ldx / 2;
  for (int64_t p = 0; p < k / 2; ++p) {
    _mm_prefetch(reinterpret_cast<const char*>(w + (p + AHEAD) * 2 * COLS), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + (p + AHEAD) * 2 * COLS + COLS), _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * 2 * COLS);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + p * 2 * COLS + COLS);
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pairs[m * ldp + p]);
      a0[m] = _mm512_dpbf16_ps(a0[m], xv, w0);
      a1[m] = _mm512_dpbf16_ps(a1[m], xv, w1);
    }
  }
}

template <typename T>
struct Call {
  const T* x;
  int64_t ldx, rows, k, n;
  const T* w;
  const T* bias;
  const T* other;
  int64_t ldother;
  Op op;
  T* out;
};

template <typename T, int M>
void rows_of_block(const Call<T>& c, int64_t row, int64_t b) {
  __m512 a0[M], a1[M];
  block<M>(c.x + row * c.ldx, c.ldx, c.w + b * c.k * COLS, c.k, a0, a1);
  for (int half = 0; half < 2; ++half) {
    const int64_t col = b * COLS + half * 16;
    if (col >= c.n) break;
    const int64_t left = c.n - col;
    const __mmask16 mask = tail_mask(left);
    const __m512 bias = c.bias ? load16(c.bias + col, mask) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) {
      __m512 v = _mm512_add_ps(half ? a1[m] : a0[m], bias);
      if (c.op == SWISH) {
        v = swish16(v);
      } else if (c.op == ADD) {
        v = _mm512_add_ps(v, load16(c.other + (row + m) * c.ldother + col, mask));
      } else if (c.op == MUL) {
        v = _mm512_mul_ps(v, load16(c.other + (row + m) * c.ldother + col, mask));
      }
      store16(c.out + (row + m) * c.n + col, v, mask);
    }
  }
}

template <typename T>
void column_block(const Call<T>& c, int64_t b) {
  for (int64_t row = 0; row < c.rows; row += ROWS) {
    switch (std::min<int64_t>(ROWS, c.rows - row)) {
      case 1: rows_of_block<T, 1>(c, row, b); break;
      case 2: rows_of_block<T, 2>(c, row, b); break;
      case 3: rows_of_block<T, 3>(c, row, b); break;
      case 4: rows_of_block<T, 4>(c, row, b); break;
      case 5: rows_of_block<T, 5>(c, row, b); break;
      case 6: rows_of_block<T, 6>(c, row, b); break;
      case 7: rows_of_block<T, 7>(c, row, b); break;
      default: rows_of_block<T, 8>(c, row, b); break;
    }
  }
}

template <typename T>
inline int64_t blocks_of(const Call<T>& c) { return (c.n + COLS - 1) / COLS; }

// Layers that read the same x (one layer, or a layer's q, k and v) in one parallel region: blocks end to end.
template <typename T>
void run(const std::vector<Call<T>>& calls) {
  std::vector<int64_t> ends;
  int64_t total = 0;
  for (const auto& c : calls) ends.push_back(total += blocks_of(c));
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      size_t i = 0;
      while (b >= ends[i]) ++i;
      column_block<T>(calls[i], b - (i ? ends[i - 1] : 0));
    }
  });
}

// silu(gate) then up * it, a column block at a time: a block of `up` reads only the block of `gate` the same
// thread has just written (up.other is gate.out).
template <typename T>
void run_gated(const Call<T>& gate, const Call<T>& up) {
  at::parallel_for(0, blocks_of(gate), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      column_block<T>(gate, b);
      column_block<T>(up, b);
    }
  });
}

// One row's attention for one kv head and the query heads that read it: scores over keys [start, n) of a
// [capacity, dim] buffer, a softmax, then the values they weigh; float32 throughout, in one order.
template <typename T>
void attend_head(const float* q, int64_t groups, const T* keys, const T* values, int64_t start, int64_t n,
                 int64_t dim, float* out, std::vector<float>& scores) {
  const int64_t len = n - start, chunks = (dim + 15) / 16;
  scores.resize(groups * len);
  for (int64_t t = 0; t < len; ++t) {
    const T* k = keys + (start + t) * dim;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t left = dim - c * 16;
        const __mmask16 mask = tail_mask(left);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, q + g * dim + c * 16), load16(k + c * 16, mask), acc);
      }
      scores[g * len + t] = _mm512_reduce_add_ps(acc);
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    float* s = scores.data() + g * len;
    float top = s[0];
    for (int64_t t = 1; t < len; ++t) top = std::max(top, s[t]);
    float sum = 0.0f;
    for (int64_t t = 0; t < len; t += 16) {
      const int64_t left = len - t;
      const __mmask16 mask = tail_mask(left);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + t), _mm512_set1_ps(top)));
      _mm512_mask_storeu_ps(s + t, mask, e);
      sum += _mm512_mask_reduce_add_ps(mask, e);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / sum);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t left = dim - c * 16;
      const __mmask16 mask = tail_mask(left);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t t = 0; t < len; ++t) {
        acc = _mm512_fmadd_ps(_mm512_set1_ps(s[t]), load16(values + (start + t) * dim + c * 16, mask), acc);
      }
      _mm512_mask_storeu_ps(out + g * dim + c * 16, mask, _mm512_mul_ps(acc, inverse));
    }
  }
}

// Every row's attention (attend_rows below says what): query [batch, heads, dim] float32, scaled; new keys
// and values [batch, kv_heads, dim]; out [batch, heads, dim] float32, zeros from row `keys.size()` on.
template <typename T>
void attend_all(const float* query, const T* new_keys, const T* new_values, const std::vector<torch::Tensor>& keys,
                const std::vector<torch::Tensor>& values, const std::vector<int64_t>& lengths, int64_t window,
                int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, float* out) {
  const int64_t groups = heads / kv_heads, rows = keys.size();
  std::memset(out, 0, batch * heads * dim * sizeof(float));
  int64_t work = 0;
  for (int64_t i = 0; i < rows; ++i) work += lengths[i];
  // Threads only where there is enough to share; a (row, kv head)'s numbers are the same either way.
  const int64_t grain = std::max<int64_t>(1, (rows * kv_heads * 4096) / std::max<int64_t>(1, work * dim * groups));
  for (int64_t i = 0; i < rows; ++i) {  // the new key and value first: every head reads them
    const int64_t at = lengths[i] - 1, capacity = keys[i].size(1);
    for (int64_t h = 0; h < kv_heads; ++h) {
      std::memcpy(keys[i].data_ptr<T>() + (h * capacity + at) * dim, new_keys + (i * kv_heads + h) * dim,
                  dim * sizeof(T));
      std::memcpy(values[i].data_ptr<T>() + (h * capacity + at) * dim, new_values + (i * kv_heads + h) * dim,
                  dim * sizeof(T));
    }
  }
  at::parallel_for(0, rows * kv_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / kv_heads, h = item % kv_heads, capacity = keys[i].size(1), n = lengths[i];
      const int64_t start = window > 0 ? std::max<int64_t>(0, n - window) : 0;
      attend_head<T>(query + (i * heads + h * groups) * dim, groups, keys[i].data_ptr<T>() + h * capacity * dim,
                     values[i].data_ptr<T>() + h * capacity * dim, start, n, dim, out + (i * heads + h * groups) * dim,
                     scores);
    }
  });
}

void check_rows(const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
                const std::vector<int64_t>& lengths, int64_t batch, int64_t kv_heads, int64_t dim, at::ScalarType dtype) {
  TORCH_CHECK(values.size() == keys.size() && lengths.size() == keys.size() && (int64_t)keys.size() <= batch);
  for (size_t i = 0; i < keys.size(); ++i) {
    TORCH_CHECK(keys[i].is_contiguous() && values[i].is_contiguous() && keys[i].scalar_type() == dtype);
    TORCH_CHECK(values[i].scalar_type() == dtype && keys[i].size(0) == kv_heads && keys[i].size(2) == dim);
    TORCH_CHECK(keys[i].sizes() == values[i].sizes() && lengths[i] >= 1 && lengths[i] <= keys[i].size(1));
  }
}

// transformers' LlamaRMSNorm, a row at a time: float32 x * rsqrt(mean(x^2) + eps), rounded to x's dtype, then
// times the weight and rounded again.
template <typename T>
void rms_norm_rows(const T* xs, const T* ws, int64_t rows, int64_t hidden, float eps, T* os) {
  const int64_t chunks = (hidden + 15) / 16;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = xs + r * hidden;
    __m512 squares = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __mmask16 mask = tail_mask(hidden - c * 16);
      const __m512 v = load16(row + c * 16, mask);
      squares = _mm512_fmadd_ps(v, v, squares);
    }
    const float scale = 1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / hidden + eps);
    for (int64_t c = 0; c < chunks; ++c) {
      const __mmask16 mask = tail_mask(hidden - c * 16);
      T* target = os + r * hidden + c * 16;
      store16(target, _mm512_mul_ps(load16(row + c * 16, mask), _mm512_set1_ps(scale)), mask);  // rounded
      store16(target, _mm512_mul_ps(load16(ws + c * 16, mask), load16(target, mask)), mask);
    }
  }
}

// v rounded to T and widened again: what storing an intermediate tensor of dtype T does to it.
inline __m512 rounded(__m512 v, const float*) { return v; }
inline __m512 rounded(__m512 v, const at::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// transformers' apply_rotary_pos_emb on one head in place: x * cos + rotate_half(x) * sin, each product and
// the sum rounded to T as its three tensor operations round them.
template <typename T>
void rotate_head(T* x, const T* cos, const T* sin, int64_t dim) {
  const int64_t half = dim / 2;
  alignas(64) float turned[512];  // dim <= 512 (checked)
  for (int64_t part = 0; part < 2; ++part) {
    for (int64_t c = 0; c < half; c += 16) {
      const __mmask16 mask = tail_mask(half - c);
      const int64_t at = part * half + c, across = (1 - part) * half + c;
      __m512 other = load16(x + across, mask);
      if (part == 0) other = _mm512_sub_ps(_mm512_setzero_ps(), other);  // rotate_half: cat(-x2, x1)
      const __m512 a = rounded(_mm512_mul_ps(load16(x + at, mask), load16(cos + at, mask)), x);
      const __m512 b = rounded(_mm512_mul_ps(other, load16(sin + at, mask)), x);
      _mm512_mask_storeu_ps(turned + at, mask, _mm512_add_ps(a, b));
    }
  }
  for (int64_t c = 0; c < dim; c += 16) store16(x + c, load16(turned + c, tail_mask(dim - c)), tail_mask(dim - c));
}

template <typename T>
Call<T> call_of(const T* x, int64_t rows, int64_t k, const torch::Tensor& w, int64_t n,
                const c10::optional<torch::Tensor>& bias, const T* other, Op op, T* out) {
  return Call<T>{x, k, rows, k, n, w.data_ptr<T>(), bias ? bias->data_ptr<T>() : nullptr, other, n, op, out};
}

}  // namespace

// A decode step's attention for every row (backend.decode.batch_cache.decode_attention): row i writes its new
// key and value at position lengths[i] - 1 of its buffers [kv_heads, capacity, dim] and attends over its own
// keys (the last `window` when window > 0). query [B, heads, dim] float32, already scaled; new_keys and
// new_values [B, kv_heads, dim] in the buffers' dtype. Returns [B, heads, dim] float32; rows beyond the lists
// (padding) give zeros. Each (row, kv head) is one thread's, summed in one order: no row sees another.
torch::Tensor attend_rows(const torch::Tensor& query, const torch::Tensor& new_keys, const torch::Tensor& new_values,
                          const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
                          const std::vector<int64_t>& lengths, int64_t window) {
  const int64_t batch = query.size(0), heads = query.size(1), dim = query.size(2), kv_heads = new_keys.size(1);
  TORCH_CHECK(query.is_contiguous() && query.scalar_type() == at::kFloat && heads % kv_heads == 0);
  TORCH_CHECK(new_keys.is_contiguous() && new_values.is_contiguous() && new_keys.sizes() == new_values.sizes());
  const auto dtype = new_keys.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "float32 or bfloat16 only");
  check_rows(keys, values, lengths, batch, kv_heads, dim, dtype);
  auto out = torch::empty({batch, heads, dim}, query.options());
  auto run = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    attend_all<T>(query.data_ptr<float>(), new_keys.data_ptr<T>(), new_values.data_ptr<T>(), keys, values, lengths,
                  window, batch, heads, kv_heads, dim, out.data_ptr<float>());
  };
  if (dtype == at::kBFloat16) run(static_cast<at::BFloat16*>(nullptr));
  else run(static_cast<float*>(nullptr));
  return out;
}

// Llama's RMSNorm as transformers computes it (rms_norm_rows). x [rows, hidden] contiguous, weight [hidden].
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous() && weight.numel() == x.size(1));
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight in one dtype");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat, "float32 or bfloat16 only");
  auto out = torch::empty_like(x);
  auto run = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    rms_norm_rows<T>(x.data_ptr<T>(), weight.data_ptr<T>(), x.size(0), x.size(1), static_cast<float>(eps),
                     out.data_ptr<T>());
  };
  if (bf16) run(static_cast<at::BFloat16*>(nullptr));
  else run(static_cast<float*>(nullptr));
  return out;
}

// One Llama decoder layer of a decode step, the maths of backend/decode/fused_step.py's layer in one call:
//   h = norm(x); q, k, v = h Wq, h Wk, h Wv (+ biases); q, k turned by the rotary embedding (cos, sin [B, dim]);
//   each row writes k, v into its own buffers and attends over them (as attend_rows, query * scaling in float32);
//   x += attention Wo; h = norm(x); x += (silu(h Wgate) * h Wup) Wdown.
// Every intermediate is rounded to x's dtype where the op-by-op step's tensors round it, so the result is that
// step's bit for bit (tests check it); the saving is the ~25 Python-level operations a layer made.
// Only the rows that have keys (the first keys.size()) are computed; the batch's padding rows pass through
// unchanged. Every row's numbers are its own whatever the others are or how many (as `linear`'s), so the fixed
// batch the engine pads to for other kernels' sake costs nothing here.
// weights: the 7 packed weights q, k, v, o, gate, up, down; outs their output sizes; biases theirs or None.
torch::Tensor decoder_layer(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                            const std::vector<int64_t>& outs, const std::vector<c10::optional<torch::Tensor>>& biases,
                            const torch::Tensor& input_norm, double input_eps, const torch::Tensor& post_norm,
                            double post_eps, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads,
                            int64_t kv_heads, double scaling, int64_t window, const std::vector<torch::Tensor>& keys,
                            const std::vector<torch::Tensor>& values, const std::vector<int64_t>& lengths) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "float32 or bfloat16 only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weights.size() == 7 && outs.size() == 7 && biases.size() == 7);
  const int64_t batch = x.size(0), hidden = x.size(1), dim = outs[0] / heads, inner = outs[4];
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && outs[0] == heads * dim && dim % 2 == 0);
  TORCH_CHECK(dim <= 512 && outs[1] == kv_heads * dim && outs[2] == kv_heads * dim && outs[3] == hidden);
  TORCH_CHECK(outs[5] == inner && outs[6] == hidden);
  const int64_t ins[7] = {hidden, hidden, hidden, heads * dim, hidden, hidden, inner};
  for (int i = 0; i < 7; ++i) {
    const auto& w = weights[i];
    TORCH_CHECK(w.is_contiguous() && w.dim() == 3 && w.size(2) == COLS && w.size(1) == ins[i] &&
                w.size(0) * COLS >= outs[i] && w.scalar_type() == dtype, "packed weight ", i, " does not fit");
    if (biases[i]) TORCH_CHECK(biases[i]->is_contiguous() && biases[i]->numel() == outs[i] &&
                               biases[i]->scalar_type() == dtype);
  }
  for (const auto* norm : {&input_norm, &post_norm})
    TORCH_CHECK(norm->is_contiguous() && norm->numel() == hidden && norm->scalar_type() == dtype);
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == batch * dim && sin.numel() == batch * dim);
  TORCH_CHECK(cos.scalar_type() == dtype && sin.scalar_type() == dtype);
  TORCH_CHECK(dtype == at::kFloat || (hidden % 2 == 0 && (heads * dim) % 2 == 0 && inner % 2 == 0));
  check_rows(keys, values, lengths, batch, kv_heads, dim, dtype);

  const int64_t live = keys.size();  // rows with keys; the rest of the batch is padding
  const auto options = x.options();
  auto h = torch::empty({live, hidden}, options);
  auto q = torch::empty({live, heads * dim}, options), k = torch::empty({live, kv_heads * dim}, options);
  auto v = torch::empty({live, kv_heads * dim}, options);
  auto query = torch::empty({live, heads * dim}, options.dtype(at::kFloat));
  auto attended = torch::empty({live, heads * dim}, options.dtype(at::kFloat));
  auto mid = torch::empty({live, hidden}, options), gate = torch::empty({live, inner}, options);
  auto mixed = torch::empty({live, inner}, options), out = torch::empty({batch, hidden}, options);
  auto layer = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    T *hs = h.data_ptr<T>(), *qs = q.data_ptr<T>(), *ks = k.data_ptr<T>(), *vs = v.data_ptr<T>();
    rms_norm_rows<T>(x.data_ptr<T>(), input_norm.data_ptr<T>(), live, hidden, static_cast<float>(input_eps), hs);
    run<T>({call_of<T>(hs, live, hidden, weights[0], outs[0], biases[0], nullptr, NONE, qs),
            call_of<T>(hs, live, hidden, weights[1], outs[1], biases[1], nullptr, NONE, ks),
            call_of<T>(hs, live, hidden, weights[2], outs[2], biases[2], nullptr, NONE, vs)});
    const T *cs = cos.data_ptr<T>(), *ss = sin.data_ptr<T>();
    const float scale = static_cast<float>(scaling);
    float* qf = query.data_ptr<float>();
    for (int64_t i = 0; i < live; ++i) {
      for (int64_t head = 0; head < heads; ++head) {
        T* one = qs + (i * heads + head) * dim;
        rotate_head<T>(one, cs + i * dim, ss + i * dim, dim);
        for (int64_t c = 0; c < dim; c += 16) {  // query.float() * scaling
          const __mmask16 mask = tail_mask(dim - c);
          _mm512_mask_storeu_ps(qf + (i * heads + head) * dim + c, mask,
                                _mm512_mul_ps(load16(one + c, mask), _mm512_set1_ps(scale)));
        }
      }
      for (int64_t head = 0; head < kv_heads; ++head) rotate_head<T>(ks + (i * kv_heads + head) * dim, cs + i * dim,
                                                                     ss + i * dim, dim);
    }
    float* af = attended.data_ptr<float>();
    attend_all<T>(qf, ks, vs, keys, values, lengths, window, live, heads, kv_heads, dim, af);
    T* as = q.data_ptr<T>();  // the attention, rounded to T, where q was
    for (int64_t c = 0; c < live * heads * dim; c += 16) store16(as + c, load16(af + c, tail_mask(live * heads * dim - c)),
                                                                 tail_mask(live * heads * dim - c));
    T *ms = mid.data_ptr<T>(), *gs = gate.data_ptr<T>(), *xs = mixed.data_ptr<T>();
    run<T>({call_of<T>(as, live, heads * dim, weights[3], hidden, biases[3], x.data_ptr<T>(), ADD, ms)});
    rms_norm_rows<T>(ms, post_norm.data_ptr<T>(), live, hidden, static_cast<float>(post_eps), hs);
    run_gated<T>(call_of<T>(hs, live, hidden, weights[4], inner, biases[4], nullptr, SWISH, gs),
                 call_of<T>(hs, live, hidden, weights[5], inner, biases[5], gs, MUL, xs));
    run<T>({call_of<T>(xs, live, inner, weights[6], hidden, biases[6], ms, ADD, out.data_ptr<T>())});
    std::memcpy(out.data_ptr<T>() + live * hidden, x.data_ptr<T>() + live * hidden, (batch - live) * hidden * sizeof(T));
  };
  if (dtype == at::kBFloat16) layer(static_cast<at::BFloat16*>(nullptr));
  else layer(static_cast<float*>(nullptr));
  return out;
}

// x [rows, k] (rows contiguous); w packed [N/32, k, 32]; bias [n] or None; other [rows, n] or None.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                     const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& other,
                     int64_t op) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w.is_contiguous() && w.dim() == 3 && w.size(2) == COLS);
  TORCH_CHECK(x.size(1) == w.size(1) && x.scalar_type() == w.scalar_type() && w.size(0) * COLS >= n);
  TORCH_CHECK(op >= NONE && op <= MUL && ((op == ADD || op == MUL) == other.has_value()));
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat, "float32 or bfloat16 only");
  TORCH_CHECK(!bf16 || x.size(1) % 2 == 0, "bfloat16 rows need an even length");
  if (bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == n && bias->scalar_type() == x.scalar_type());
  if (other) {
    TORCH_CHECK(other->dim() == 2 && other->size(0) == x.size(0) && other->size(1) == n && other->stride(1) == 1);
    TORCH_CHECK(other->scalar_type() == x.scalar_type());
  }
  auto out = torch::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return out;
  auto call = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    Call<T> c{x.data_ptr<T>(), x.stride(0), x.size(0), x.size(1), n, w.data_ptr<T>(),
              bias ? bias->data_ptr<T>() : nullptr, other ? other->data_ptr<T>() : nullptr,
              other ? other->stride(0) : 0, static_cast<Op>(op), out.data_ptr<T>()};
    run<T>({c});
  };
  if (bf16) call(static_cast<at::BFloat16*>(nullptr));
  else call(static_cast<float*>(nullptr));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL: other Python threads (the UI, streaming) run while a layer computes.
  m.def("linear", &linear, py::call_guard<py::gil_scoped_release>());
  m.def("attend_rows", &attend_rows, py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, py::call_guard<py::gil_scoped_release>());
  m.def("decoder_layer", &decoder_layer, py::call_guard<py::gil_scoped_release>());
}
