// One decoding step's LoRA update for a mixed-adapter batch, on the CPU:
//   out[row] += (x[row] · A[c0:c1]ᵀ) · B_t[c0:c1]   for each listed row and its columns c0:c1,
// where A [Σr, in] and B_t [Σr, out] are a layer's adapters stacked along r (fp32, scaling
// folded into B_t). Built and loaded by decode_kernel.py.
//
// Why a kernel: a decoding step makes ~200 such updates of a few rows each. In torch each is
// 6-8 small calls (gather, cast, two batched products, gather back, add) whose fixed costs
// outweigh the arithmetic; here it is one call that reads each adapter's weights once per row
// (rows come sorted by adapter, so a group's second row finds them in cache). Rows run in
// parallel on torch's intra-op threads.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float v) { return v; }
inline float to_float(uint16_t bf16) {
  const uint32_t bits = uint32_t(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void store(float v, float* p) { *p = v; }
inline void store(float v, uint16_t* p) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  *p = v != v ? uint16_t(0x7FC0) : uint16_t(rounded);
}

// s[m] = a[m] · x[m] for m < 4, over `in` elements: four independent FMA chains, so the
// vector units are not waiting on one accumulator.
inline void dot4(const float* const a[4], const float* const x[4], int64_t in, float* s) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < in; ++i) {
    s0 += a0[i] * x0[i];
    s1 += a1[i] * x1[i];
    s2 += a2[i] * x2[i];
    s3 += a3[i] * x3[i];
  }
  s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;
}

// out_row += (x_row · Aᵀ) · B_t for one row; a: [rank, in], b_t: [rank, n_out].
template <typename X>
void update_row(X* out_row, const X* x_row, const float* a, const float* b_t, int64_t rank,
                int64_t in, int64_t n_out, float* xf, float* h) {
#pragma omp simd
  for (int64_t i = 0; i < in; ++i) xf[i] = to_float(x_row[i]);
  int64_t k = 0;
  for (; k + 4 <= rank; k += 4) {  // four rows of A against the one x
    const float* ak[4] = {a + k * in, a + (k + 1) * in, a + (k + 2) * in, a + (k + 3) * in};
    const float* xs[4] = {xf, xf, xf, xf};
    dot4(ak, xs, in, h + k);
  }
  for (; k < rank; ++k) {
    const float* ak = a + k * in;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < in; ++i) s += ak[i] * xf[i];
    h[k] = s;
  }
  // blocks of output columns accumulated in registers over the rank, then added once
  constexpr int64_t kBlock = 32;
  int64_t j0 = 0;
  for (; j0 + kBlock <= n_out; j0 += kBlock) {
    float acc[kBlock] = {};
    for (int64_t q = 0; q < rank; ++q) {
      const float* bq = b_t + q * n_out + j0;
      const float hq = h[q];
#pragma omp simd
      for (int64_t t = 0; t < kBlock; ++t) acc[t] += hq * bq[t];
    }
#pragma omp simd
    for (int64_t t = 0; t < kBlock; ++t) {
      store(to_float(out_row[j0 + t]) + acc[t], out_row + j0 + t);
    }
  }
  for (int64_t j = j0; j < n_out; ++j) {
    float acc = 0.f;
    for (int64_t q = 0; q < rank; ++q) acc += h[q] * b_t[q * n_out + j];
    store(to_float(out_row[j]) + acc, out_row + j);
  }
}

// Four rows of one adapter at once: each weight is loaded once for the four (a prefill's
// tokens, or a decoding batch's rows of one adapter).
template <typename X>
void update_four_rows(X* out, const X* x, const int64_t* rows, const float* a, const float* b_t,
                      int64_t rank, int64_t in, int64_t n_out, float* xf, float* h) {
  for (int m = 0; m < 4; ++m) {
    const X* x_row = x + rows[m] * in;
#pragma omp simd
    for (int64_t i = 0; i < in; ++i) xf[m * in + i] = to_float(x_row[i]);
  }
  const float* xs[4] = {xf, xf + in, xf + 2 * in, xf + 3 * in};
  for (int64_t k = 0; k < rank; ++k) {  // one row of A against the four x
    const float* ak[4] = {a + k * in, a + k * in, a + k * in, a + k * in};
    float s[4];
    dot4(ak, xs, in, s);
    h[k] = s[0], h[rank + k] = s[1], h[2 * rank + k] = s[2], h[3 * rank + k] = s[3];
  }
  constexpr int64_t kBlock = 16;
  int64_t j0 = 0;
  for (; j0 + kBlock <= n_out; j0 += kBlock) {
    float acc[4][kBlock] = {};
    for (int64_t q = 0; q < rank; ++q) {
      const float* bq = b_t + q * n_out + j0;
      const float h0 = h[q], h1 = h[rank + q], h2 = h[2 * rank + q], h3 = h[3 * rank + q];
#pragma omp simd
      for (int64_t t = 0; t < kBlock; ++t) {
        acc[0][t] += h0 * bq[t];
        acc[1][t] += h1 * bq[t];
        acc[2][t] += h2 * bq[t];
        acc[3][t] += h3 * bq[t];
      }
    }
    for (int m = 0; m < 4; ++m) {
      X* o = out + rows[m] * n_out + j0;
#pragma omp simd
      for (int64_t t = 0; t < kBlock; ++t) store(to_float(o[t]) + acc[m][t], o + t);
    }
  }
  for (int64_t j = j0; j < n_out; ++j) {
    for (int m = 0; m < 4; ++m) {
      float acc = 0.f;
      for (int64_t q = 0; q < rank; ++q) acc += h[m * rank + q] * b_t[q * n_out + j];
      X* o = out + rows[m] * n_out + j;
      store(to_float(*o) + acc, o);
    }
  }
}

template <typename X>
void update_rows(X* out, const X* x, const float* a, const float* b_t, const int64_t* rows,
                 const int64_t* cols, int64_t n, int64_t in, int64_t n_out) {
  at::parallel_for(0, n, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> xf(4 * in), h;
    int64_t p = p0;
    while (p < p1) {
      const int64_t c0 = cols[2 * p], c1 = cols[2 * p + 1], rank = c1 - c0;
      h.resize(4 * rank);
      bool four = p + 4 <= p1;
      for (int64_t q = p + 1; four && q < p + 4; ++q) {
        four = cols[2 * q] == c0 && cols[2 * q + 1] == c1;
      }
      if (four) {  // rows sorted by adapter make this the common case
        update_four_rows(out, x, rows + p, a + c0 * in, b_t + c0 * n_out, rank, in, n_out,
                         xf.data(), h.data());
        p += 4;
      } else {
        update_row(out + rows[p] * n_out, x + rows[p] * in, a + c0 * in, b_t + c0 * n_out, rank,
                   in, n_out, xf.data(), h.data());
        p += 1;
      }
    }
  });
}

}  // namespace

// out [rows, n_out] and x [rows, in]: both float32 or both bfloat16, contiguous; a, b_t:
// float32, contiguous; rows [n] int64: the rows to update; cols [n, 2] int64: their columns.
void lora_decode_(torch::Tensor out, torch::Tensor x, torch::Tensor a, torch::Tensor b_t,
                  torch::Tensor rows, torch::Tensor cols) {
  TORCH_CHECK(out.dim() == 2 && x.dim() == 2 && out.size(0) == x.size(0), "out/x: [rows, *]");
  TORCH_CHECK(a.size(1) == x.size(1) && b_t.size(1) == out.size(1) && a.size(0) == b_t.size(0),
              "a [r, in] / b_t [r, out] do not match x / out");
  TORCH_CHECK(out.is_contiguous() && x.is_contiguous() && a.is_contiguous() &&
                  b_t.is_contiguous() && rows.is_contiguous() && cols.is_contiguous(),
              "lora_decode_ needs contiguous tensors");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b_t.scalar_type() == at::kFloat, "a, b_t: fp32");
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong &&
                  cols.dim() == 2 && cols.size(0) == rows.size(0) && cols.size(1) == 2,
              "rows [n] / cols [n, 2]: int64");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out and x differ in dtype");
  const int64_t n = rows.size(0), in = x.size(1), n_out = out.size(1);
  const auto* r = rows.data_ptr<int64_t>();
  const auto* c = cols.data_ptr<int64_t>();
  const auto* ap = a.data_ptr<float>();
  const auto* bp = b_t.data_ptr<float>();
  if (x.scalar_type() == at::kFloat) {
    update_rows(out.data_ptr<float>(), x.data_ptr<float>(), ap, bp, r, c, n, in, n_out);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
    update_rows(reinterpret_cast<uint16_t*>(out.data_ptr()),
                reinterpret_cast<const uint16_t*>(x.data_ptr()), ap, bp, r, c, n, in, n_out);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_decode_", &lora_decode_, "out[rows] += x[rows] A[cols]^T B_t[cols], in place");
}
