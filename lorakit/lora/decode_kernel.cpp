// A mixed-adapter batch's LoRA update on the CPU:
//   out[row] += (x[row] · A[c0:c1]ᵀ) · B_t[c0:c1]   for each listed row and its columns c0:c1,
// where A [Σr, in] and B_t [Σr, out] are a layer's adapters stacked along r (scaling folded
// into B_t), in x's dtype: fp32, or bf16 (read as fp32; products accumulate in fp32). A row is a
// decoding step's sequence or a prefill's token. Built and loaded by decode_kernel.py.
//
// Why a kernel: a decoding step makes ~200 such updates of a few rows each. In torch each is
// 6-8 small calls (gather, cast, two batched products, gather back, add) whose fixed costs
// outweigh the arithmetic; here it is one call that reads each adapter's weights once per chunk
// of rows. Rows come sorted by adapter and are cut into chunks of up to kChunk rows of one
// adapter; chunks run in parallel on torch's intra-op threads. Within a chunk both products are
// register-blocked (several rows × several columns per pass over the weights), so a prefill's
// tokens run at GEMM-like speed in fp32.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) || defined(__AMX_TILE__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// Vector width and register blocks: AVX-512 has 32 registers of 16 floats, AVX2 16 of 8.
#if defined(__AVX512F__)
constexpr int W = 16;
constexpr int kChunk = 8;  // rows per chunk: the second product's block of rows
constexpr int kRanks = 4;  // first product: rows of A per block (× up to 4 rows of x)
#else
constexpr int W = 8;
constexpr int kChunk = 4;
constexpr int kRanks = 2;
#endif
constexpr int kCols = 2;  // second product: vectors of output columns per block

typedef float vec __attribute__((vector_size(W * sizeof(float))));

inline vec loadu(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vec loadu(const uint16_t* p) {  // W bf16 values as fp32: their bits in the high half
  typedef uint16_t narrow __attribute__((vector_size(W * sizeof(uint16_t))));
  typedef uint32_t wide __attribute__((vector_size(W * sizeof(uint32_t))));
  narrow n;
  std::memcpy(&n, p, sizeof n);
  const wide w = __builtin_convertvector(n, wide) << 16;
  vec v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
inline void storeu(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

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

// s[t * R + r] = x[t] · a[r] over `in` elements, for T rows of x and R rows of A: T × R vector
// accumulators, each loaded x and a vector used R resp. T times.
template <int T, int R, typename Wt>
inline void dots(const float* const* x, const Wt* const* a, int64_t in, float* s) {
  vec acc[T][R] = {};
  int64_t i = 0;
  for (; i + W <= in; i += W) {
    vec xv[T];
    for (int t = 0; t < T; ++t) xv[t] = loadu(x[t] + i);
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(a[r] + i + 8 * W);
      const vec av = loadu(a[r] + i);
      for (int t = 0; t < T; ++t) acc[t][r] += xv[t] * av;
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int r = 0; r < R; ++r) {
      float v = 0.f;
#pragma omp simd reduction(+ : v)
      for (int l = 0; l < W; ++l) v += acc[t][r][l];
      for (int64_t j = i; j < in; ++j) v += x[t][j] * to_float(a[r][j]);
      s[t * R + r] = v;
    }
  }
}

#if defined(__AVX512BF16__)
// The same for bf16 x and A where the CPU multiplies bf16 pairs (AVX512-BF16): 32 products per
// instruction, read as stored (no conversion of x or A), summed in fp32.
template <int T, int R>
inline void dots(const uint16_t* const* x, const uint16_t* const* a, int64_t in, float* s) {
  __m512 acc[T][R];
  for (int t = 0; t < T; ++t) {
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    __m512bh xv[T];
    for (int t = 0; t < T; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(x[t] + i);
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(a[r] + i + 8 * 32);
      const __m512bh av = (__m512bh)_mm512_loadu_si512(a[r] + i);
      for (int t = 0; t < T; ++t) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv[t], av);
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int r = 0; r < R; ++r) {
      float v = _mm512_reduce_add_ps(acc[t][r]);
      for (int64_t j = i; j < in; ++j) v += to_float(x[t][j]) * to_float(a[r][j]);
      s[t * R + r] = v;
    }
  }
}
constexpr bool kBf16Dots = true;
#else
constexpr bool kBf16Dots = false;
#endif

// h[t, :] = x[t] · Aᵀ for T rows (h: stride `rank`); a: [rank, in].
template <int T, typename Xr, typename Wt>
void project_rows(const Xr* const* xs, int64_t in, const Wt* a, int64_t rank, float* h) {
  float s[T * kRanks];
  int64_t k = 0;
  for (; k + kRanks <= rank; k += kRanks) {
    const Wt* as[kRanks];
    for (int r = 0; r < kRanks; ++r) as[r] = a + (k + r) * in;
    dots<T, kRanks>(xs, as, in, s);
    for (int t = 0; t < T; ++t) {
      for (int r = 0; r < kRanks; ++r) h[t * rank + k + r] = s[t * kRanks + r];
    }
  }
  for (; k < rank; ++k) {
    const Wt* as[1] = {a + k * in};
    dots<T, 1>(xs, as, in, s);
    for (int t = 0; t < T; ++t) h[t * rank + k] = s[t];
  }
}

// h [nt, rank] = x [nt rows] · Aᵀ, in blocks of 4, 2 and 1 rows (a decoding batch has a few
// rows per adapter: no block computes rows that are not there).
template <typename Xr, typename Wt>
void project(const Xr* const* xs, int nt, int64_t in, const Wt* a, int64_t rank, float* h) {
  int t = 0;
  for (; t + 4 <= nt; t += 4) project_rows<4>(xs + t, in, a, rank, h + t * rank);
  if (t + 2 <= nt) {
    project_rows<2>(xs + t, in, a, rank, h + t * rank);
    t += 2;
  }
  if (t < nt) project_rows<1>(xs + t, in, a, rank, h + t * rank);
}

// out[t] += h[t] · B_t for N rows; b_t: [rank, n_out]. Blocks of N rows × kCols vectors of
// columns accumulate in registers over the rank, then are added to the output once.
template <int N, typename X>
void expand(X* const* out, const float* h, int64_t rank, const X* b_t, int64_t n_out) {
  constexpr int64_t C = kCols * W;
  int64_t j0 = 0;
  for (; j0 + C <= n_out; j0 += C) {
    vec acc[N][kCols] = {};
    for (int64_t q = 0; q < rank; ++q) {
      // the rank's rows of B_t are as many streams, more than the hardware prefetcher follows
      __builtin_prefetch(b_t + q * n_out + j0 + 8 * C);
      vec bv[kCols];
      for (int c = 0; c < kCols; ++c) bv[c] = loadu(b_t + q * n_out + j0 + c * W);
      for (int t = 0; t < N; ++t) {
        const float hq = h[t * rank + q];
        for (int c = 0; c < kCols; ++c) acc[t][c] += hq * bv[c];
      }
    }
    for (int t = 0; t < N; ++t) {
      float sum[C];
      for (int c = 0; c < kCols; ++c) storeu(sum + c * W, acc[t][c]);
      X* o = out[t] + j0;
#pragma omp simd
      for (int64_t l = 0; l < C; ++l) store(to_float(o[l]) + sum[l], o + l);
    }
  }
  for (int64_t j = j0; j < n_out; ++j) {  // the last columns, fewer than one block
    for (int t = 0; t < N; ++t) {
      float acc = 0.f;
      for (int64_t q = 0; q < rank; ++q) acc += h[t * rank + q] * to_float(b_t[q * n_out + j]);
      store(to_float(out[t][j]) + acc, out[t] + j);
    }
  }
}

template <typename X>
void expand_rows(int nt, X* const* out, const float* h, int64_t rank, const X* b_t,
                 int64_t n_out) {
  switch (nt) {
    case 1: return expand<1>(out, h, rank, b_t, n_out);
    case 2: return expand<2>(out, h, rank, b_t, n_out);
    case 3: return expand<3>(out, h, rank, b_t, n_out);
    case 4: return expand<4>(out, h, rank, b_t, n_out);
    case 5: return expand<5>(out, h, rank, b_t, n_out);
    case 6: return expand<6>(out, h, rank, b_t, n_out);
    case 7: return expand<7>(out, h, rank, b_t, n_out);
    default: return expand<kChunk>(out, h, rank, b_t, n_out);
  }
}

// X: float, or uint16_t for bf16 (x, out and the weights alike)
template <typename X>
void update_rows(X* out, const X* x, const X* a, const X* b_t, const int64_t* rows,
                 const int64_t* cols, int64_t n, int64_t in, int64_t n_out) {
  // chunks: runs of up to kChunk consecutive entries with the same columns (one adapter)
  std::vector<int64_t> starts;
  for (int64_t p = 0; p < n;) {
    starts.push_back(p);
    const int64_t c0 = cols[2 * p], c1 = cols[2 * p + 1];
    int64_t q = p + 1;
    while (q < n && q - p < kChunk && cols[2 * q] == c0 && cols[2 * q + 1] == c1) ++q;
    p = q;
  }
  starts.push_back(n);
  const int64_t chunks = int64_t(starts.size()) - 1;
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<float> xf(kChunk * in), h;
    X* out_rows[kChunk];
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t p = starts[k];
      const int nt = int(starts[k + 1] - p);
      const int64_t c0 = cols[2 * p], rank = cols[2 * p + 1] - c0;
      h.resize(size_t(nt * rank));
      for (int t = 0; t < nt; ++t) out_rows[t] = out + rows[p + t] * n_out;
      if constexpr (kBf16Dots && std::is_same_v<X, uint16_t>) {
        const X* x_rows[kChunk];
        for (int t = 0; t < nt; ++t) x_rows[t] = x + rows[p + t] * in;
        project(x_rows, nt, in, a + c0 * in, rank, h.data());
      } else {  // x as fp32, converted once per chunk
        const float* x_rows[kChunk];
        for (int t = 0; t < nt; ++t) {
          const X* x_row = x + rows[p + t] * in;
          float* xf_row = xf.data() + t * in;
#pragma omp simd
          for (int64_t i = 0; i < in; ++i) xf_row[i] = to_float(x_row[i]);
          x_rows[t] = xf_row;
        }
        project(x_rows, nt, in, a + c0 * in, rank, h.data());
      }
      expand_rows(nt, out_rows, h.data(), rank, b_t + c0 * n_out, n_out);
    }
  });
}


#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// ---- AMX tiles (bf16 only): both products as 16×16 tile multiplies ----------------------------
// Where the CPU has AMX, a chunk of up to 16 rows of one adapter (rank a multiple of 16) is two
// tile products: H [16, r] = X [16, in] · Aᵀ, then out += H (rounded to bf16) · B_t, each tile
// op 16×16×32 products. The weights come in the tiles' layout, made once per stack in Python:
//   a_tiles [Σr/16, in/32, 16, 16, 2]: [nb, kb, k2, n, e] = A[16 nb + n, 32 kb + 2 k2 + e]
//   b_tiles [Σr/16, out/16, 8, 16, 2]: [qb, ob, q2, n, e] = B_t[16 qb + 2 q2 + e, 16 ob + n]
// (AMX's pair-interleaved B operand), so every tile is one contiguous 1 KB or 512 B block.

bool tiles_allowed() {  // Linux hands out the tile state only on request, once per process
  static const bool allowed = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return allowed;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0 H (16 × 16 fp32), 1 X (16 × 32 bf16), 2 A (16 × 16 pairs), 3 H as bf16 (16 × 16),
// 4 B (8 × 16 pairs), 5 the output block (16 × 16 fp32).
TileConfig lora_tiles() {
  TileConfig c;
  const int rows[6] = {16, 16, 16, 16, 8, 16}, bytes[6] = {64, 64, 64, 32, 64, 64};
  for (int i = 0; i < 6; ++i) c.rows[i] = uint8_t(rows[i]), c.colsb[i] = uint16_t(bytes[i]);
  return c;
}

void tile_chunk(uint16_t* out, const uint16_t* x, const uint16_t* a_tiles,
                const uint16_t* b_tiles, const int64_t* rows, int nt, int64_t c0, int64_t rank,
                int64_t in, int64_t n_out, uint16_t* xbuf, float* hf, uint16_t* hb,
                float* block) {
  // rows of the chunk side by side (rows beyond nt keep earlier data: their results are dropped)
  for (int t = 0; t < nt; ++t) std::memcpy(xbuf + t * in, x + rows[t] * in, in * 2);
  const int64_t kbs = in / 32, obs = n_out / 16, nb0 = c0 / 16, nbs = rank / 16;
  for (int64_t nb = 0; nb < nbs; ++nb) {
    _tile_zero(0);
    const uint16_t* a_blk = a_tiles + (nb0 + nb) * kbs * 512;
    for (int64_t kb = 0; kb < kbs; ++kb) {
      _tile_loadd(1, xbuf + kb * 32, in * 2);
      _tile_loadd(2, a_blk + kb * 512, 64);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, hf + nb * 16, rank * 4);
  }
  for (int64_t i = 0; i < 16 * rank; ++i) store(hf[i], hb + i);
  for (int64_t ob = 0; ob < obs; ++ob) {
    _tile_zero(5);
    for (int64_t qb = 0; qb < nbs; ++qb) {
      _tile_loadd(3, hb + qb * 16, rank * 2);
      _tile_loadd(4, b_tiles + ((nb0 + qb) * obs + ob) * 256, 64);
      _tile_dpbf16ps(5, 3, 4);
    }
    _tile_stored(5, block, 64);
    for (int t = 0; t < nt; ++t) {
      uint16_t* o = out + rows[t] * n_out + ob * 16;
      const float* v = block + t * 16;
#pragma omp simd
      for (int l = 0; l < 16; ++l) store(to_float(o[l]) + v[l], o + l);
    }
  }
}

void tile_rows(uint16_t* out, const uint16_t* x, const uint16_t* a_tiles,
               const uint16_t* b_tiles, const int64_t* rows, const int64_t* cols, int64_t n,
               int64_t in, int64_t n_out) {
  std::vector<int64_t> starts;  // runs of up to 16 rows of one adapter
  for (int64_t p = 0; p < n;) {
    starts.push_back(p);
    int64_t q = p + 1;
    while (q < n && q - p < 16 && cols[2 * q] == cols[2 * p] && cols[2 * q + 1] == cols[2 * p + 1])
      ++q;
    p = q;
  }
  starts.push_back(n);
  const int64_t chunks = int64_t(starts.size()) - 1;
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    // tile state is per thread: set ours, and put back what was there (oneDNN's kernels
    // configure their own before use, but nothing here should depend on that)
    TileConfig saved;
    _tile_storeconfig(&saved);
    const TileConfig mine = lora_tiles();
    _tile_loadconfig(&mine);
    std::vector<uint16_t> xbuf(16 * in), hb;
    std::vector<float> hf, block(256);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t p = starts[k], c0 = cols[2 * p], rank = cols[2 * p + 1] - c0;
      hf.resize(size_t(16 * rank));
      hb.resize(size_t(16 * rank));
      tile_chunk(out, x, a_tiles, b_tiles, rows + p, int(starts[k + 1] - p), c0, rank, in, n_out,
                 xbuf.data(), hf.data(), hb.data(), block.data());
    }
    if (saved.palette != 0) {
      _tile_loadconfig(&saved);
    } else {
      _tile_release();
    }
  });
}
#endif

}  // namespace

// out [rows, n_out], x [rows, in], a [Σr, in], b_t [Σr, n_out]: all float32 or all bfloat16,
// contiguous; rows [n] int64: the rows to update; cols [n, 2] int64: their columns.
void lora_decode_(torch::Tensor out, torch::Tensor x, torch::Tensor a, torch::Tensor b_t,
                  torch::Tensor rows, torch::Tensor cols) {
  TORCH_CHECK(out.dim() == 2 && x.dim() == 2 && out.size(0) == x.size(0), "out/x: [rows, *]");
  TORCH_CHECK(a.size(1) == x.size(1) && b_t.size(1) == out.size(1) && a.size(0) == b_t.size(0),
              "a [r, in] / b_t [r, out] do not match x / out");
  TORCH_CHECK(out.is_contiguous() && x.is_contiguous() && a.is_contiguous() &&
                  b_t.is_contiguous() && rows.is_contiguous() && cols.is_contiguous(),
              "lora_decode_ needs contiguous tensors");
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong &&
                  cols.dim() == 2 && cols.size(0) == rows.size(0) && cols.size(1) == 2,
              "rows [n] / cols [n, 2]: int64");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "x: float32 or bfloat16");
  TORCH_CHECK(out.scalar_type() == dtype && a.scalar_type() == dtype && b_t.scalar_type() == dtype,
              "out, a and b_t must have x's dtype");
  const int64_t n = rows.size(0), in = x.size(1), n_out = out.size(1);
  const auto* r = rows.data_ptr<int64_t>();
  const auto* c = cols.data_ptr<int64_t>();
  if (dtype == at::kFloat) {
    update_rows(out.data_ptr<float>(), x.data_ptr<float>(), a.data_ptr<float>(),
                b_t.data_ptr<float>(), r, c, n, in, n_out);
  } else {
    auto bits = [](const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
    update_rows(bits(out), bits(x), bits(a), bits(b_t), r, c, n, in, n_out);
  }
}

bool tiles_available() {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  return tiles_allowed();
#else
  return false;
#endif
}

// The same update with AMX tiles: out, x bf16 [rows, *]; a_tiles, b_tiles in the layout above;
// every adapter's first column and rank a multiple of 16, in of 32, n_out of 16.
void lora_tiles_(torch::Tensor out, torch::Tensor x, torch::Tensor a_tiles, torch::Tensor b_tiles,
                 torch::Tensor rows, torch::Tensor cols) {
  TORCH_CHECK(tiles_available(), "AMX tiles are not available on this machine");
  TORCH_CHECK(out.dim() == 2 && x.dim() == 2 && out.size(0) == x.size(0), "out/x: [rows, *]");
  const int64_t n = rows.size(0), in = x.size(1), n_out = out.size(1);
  TORCH_CHECK(in % 32 == 0 && n_out % 16 == 0, "tiles need in % 32 == 0 and out % 16 == 0");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 &&
                  a_tiles.scalar_type() == at::kBFloat16 &&
                  b_tiles.scalar_type() == at::kBFloat16,
              "tiles: bfloat16 only");
  TORCH_CHECK(out.is_contiguous() && x.is_contiguous() && a_tiles.is_contiguous() &&
                  b_tiles.is_contiguous() && rows.is_contiguous() && cols.is_contiguous(),
              "lora_tiles_ needs contiguous tensors");
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong &&
                  cols.dim() == 2 && cols.size(0) == n && cols.size(1) == 2,
              "rows [n] / cols [n, 2]: int64");
  const int64_t stacked = a_tiles.numel() / in;
  TORCH_CHECK(a_tiles.numel() == stacked * in && b_tiles.numel() == stacked * n_out &&
                  stacked % 16 == 0,
              "a_tiles / b_tiles do not match x / out");
  const auto* c = cols.data_ptr<int64_t>();
  for (int64_t p = 0; p < n; ++p) {
    TORCH_CHECK(c[2 * p] % 16 == 0 && (c[2 * p + 1] - c[2 * p]) % 16 == 0 &&
                    c[2 * p + 1] > c[2 * p] && c[2 * p + 1] <= stacked,
                "tiles: every adapter's columns must start at and span multiples of 16");
  }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  auto bits = [](const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
  tile_rows(bits(out), bits(x), bits(a_tiles), bits(b_tiles), rows.data_ptr<int64_t>(), c, n, in,
            n_out);
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // without the GIL, as torch's own ops: a server's HTTP thread goes on while a layer updates
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("lora_decode_", &lora_decode_, "out[rows] += x[rows] A[cols]^T B_t[cols], in place",
        no_gil);
  m.def("lora_tiles_", &lora_tiles_, "the same with AMX tiles, weights in the tile layout",
        no_gil);
  m.def("tiles_available", &tiles_available, "whether lora_tiles_ runs on this machine");
}
