// The per-attempt loops of tune_node.fast.adaptive_solve in C++: the same ATen calls in the
// same order as its Python loops (so the same results bit for bit), without the Python
// interpreter's cost per call, which is most of a small field's adaptive step. Built on
// first use by tune_node.fast.adaptive_native.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define NARROW_AVX512 1
#endif

using at::Tensor;

namespace {

// The elementwise tails below run as plain loops rather than chains of ATen calls (a few us each
// on these small tensors). They make the same IEEE operations in the same order as the ATen
// calls they replace (each of those rounds its result to the dtype; a scalar factor is first
// converted to it), so the same bits, provided no multiply-add is fused: hence no contraction.
#if defined(__clang__)
#define NO_FP_CONTRACT
#define NO_FP_CONTRACT_BODY _Pragma("clang fp contract(off)")
#elif defined(__GNUC__)
#define NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#define NO_FP_CONTRACT_BODY
#else
#define NO_FP_CONTRACT
#define NO_FP_CONTRACT_BODY
#endif
// The backward pass's loops over (S, B, H) are long enough for SIMD to matter: GCC vectorizes them
// with this (its -O2 here does not; vectorized, each element still gets the same IEEE operations).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// Also built for AVX-512 and AVX2, picked at load by the CPU (the same IEEE operations per element at any width).
#define VECTORIZED __attribute__((target_clones("avx512f", "avx2", "default"), optimize("fp-contract=off", "tree-vectorize")))
#elif defined(__GNUC__) && !defined(__clang__)
#define VECTORIZED __attribute__((optimize("fp-contract=off", "tree-vectorize")))
#else
#define VECTORIZED NO_FP_CONTRACT
#endif

// Reads of an (S, B, W) tensor, or one model's (B, W) as S = 1, through its strides.
template <typename scalar_t>
struct Strided {
  const scalar_t* data;
  int64_t seed_stride, row_stride, column_stride;
  explicit Strided(const Tensor& t) : data(t.data_ptr<scalar_t>()) {
    const bool single = t.dim() == 2;
    seed_stride = single ? 0 : t.stride(0);
    row_stride = t.stride(single ? 0 : 1);
    column_stride = t.stride(single ? 1 : 2);
  }
  scalar_t operator()(int64_t s, int64_t b, int64_t w) const { return data[s * seed_stride + b * row_stride + w * column_stride]; }
};

std::vector<double> to_doubles(const Tensor& t) {
  Tensor c = t.to(at::kDouble).cpu().contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

bool plain_loops_take(const Tensor& t) {
  return t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
}

// A state this narrow (columns, C*D) or narrower takes the output layer's backward product g W3^T as
// elementwise products and additions in column order (g[:, 0] W3^T[0] + g[:, 1] W3^T[1] + ...): for
// Sphere2's 2 columns a batched product costs ~3 us, its arithmetic a fraction of that. Both loops
// (these and tune_node.fast.adaptive_solve.PythonAttemptLoops, its _NARROW_WIDTH) take the same choice.
constexpr int64_t kNarrowWidth = 4;

// The field's products with a narrow side: the output layer h2 W3 (+ c3) and the input gradient gh W1^T, (B, H)
// times (H, N) with N the state's few columns, the input layer z W1 (+ c1), (B, N) times (N, H), and the first and
// last weights' gradients, (N, B) times (B, H) added to an accumulator. ATen hands them to the BLAS, which takes
// ~10 us for the first two and ~3 for the others although their arithmetic is a fraction of that: about a third of
// an adaptive evaluation pair here. On the machine measured (MKL 2024.2, AVX-512) the BLAS computes each output of
// all but the input layer as a plain sequence: the start (the bias, the accumulator, or zero), then each product
// rounded and added in the order of the shared dimension, no fused multiply-add; the input layer's chains fused
// multiply-adds over the N columns from zero and adds the bias last. The loops below do the same, with the ReLU
// next to each layer product (the input layer's after it, the output layer's on its input, in place). That order
// is the library's choice, not a documented guarantee, so a loop runs only where its check passed: on the first
// use in a process of a kind, dtype, shape, operand layout and alignment, thread count and matmul precision, the
// loop and ATen's call run on pseudo-random data laid out alike and every output bit is compared. Elsewhere
// ATen's call runs. The input layer's loop needs AVX-512 (elsewhere a fused multiply-add may be a library call).
enum class NarrowKind : int { kBmm, kAccumulate, kInputAddmm, kInputBaddbmm, kOutputAddmm, kOutputBaddbmm };
constexpr int kNarrowKinds = 6;

bool input_kind(NarrowKind kind) { return kind == NarrowKind::kInputAddmm || kind == NarrowKind::kInputBaddbmm; }
bool output_kind(NarrowKind kind) { return kind == NarrowKind::kOutputAddmm || kind == NarrowKind::kOutputBaddbmm; }
bool batched_kind(NarrowKind kind) { return kind != NarrowKind::kInputAddmm && kind != NarrowKind::kOutputAddmm; }

std::atomic<bool> narrow_products_enabled{std::getenv("TUNE_NODE_NARROW_PRODUCTS") == nullptr ||
                                          std::string(std::getenv("TUNE_NODE_NARROW_PRODUCTS")) != "0"};

// Per kind, how its calls went: the loop ran; ATen's call ran because the check failed, because the operands are
// not the loop's (device, dtype, layout, width), or because no loop exists here (the input layer's without
// AVX-512 or in float64) or the loops are off.
enum NarrowOutcome : int { kTaken, kCheckFailed, kNotTheLoops, kNoLoop };
std::array<std::atomic<int64_t>, kNarrowKinds * 4> narrow_outcomes{};

bool counted(NarrowKind kind, NarrowOutcome outcome) {
  narrow_outcomes[static_cast<int>(kind) * 4 + outcome].fetch_add(1, std::memory_order_relaxed);
  return outcome == kTaken;
}

// An operand's strides with a leading seed stride (0 for one model's).
struct Placement {
  int64_t seed, row, column;
};

Placement placement_of(const Tensor& t, bool batched) {
  if (t.dim() == 1) return {0, 0, t.stride(0)};
  return {batched ? t.stride(0) : 0, t.stride(-2), t.stride(-1)};
}

// How many elements past a 64-byte boundary an operand starts.
int64_t misalignment_of(const Tensor& t) {
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr()) % 64) / static_cast<int64_t>(t.element_size());
}

// out[r, j] = start[j] + sum_k a[r, k] b[k, j] over k in order (start zero where null), for one contiguous
// (rows, inner) a and out, b and start through their strides; rows in blocks so the sums' chains interleave.
template <typename scalar_t>
NO_FP_CONTRACT void narrow_rows(const scalar_t* a, const scalar_t* b, int64_t b_row, int64_t b_column, const scalar_t* start, int64_t start_column,
                                scalar_t* out, int64_t rows, int64_t inner, int64_t width) {
  NO_FP_CONTRACT_BODY
  constexpr int64_t block = 8;
  scalar_t acc[block][kNarrowWidth];
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t count = std::min(block, rows - r0);
    for (int64_t t = 0; t < count; ++t)
      for (int64_t j = 0; j < width; ++j) acc[t][j] = start ? start[j * start_column] : scalar_t(0);
    for (int64_t k = 0; k < inner; ++k)
      for (int64_t t = 0; t < count; ++t) {
        const scalar_t v = a[(r0 + t) * inner + k];
        for (int64_t j = 0; j < width; ++j) acc[t][j] += v * b[k * b_row + j * b_column];
      }
    for (int64_t t = 0; t < count; ++t)
      for (int64_t j = 0; j < width; ++j) out[(r0 + t) * width + j] = acc[t][j];
  }
}

#ifdef NARROW_AVX512
bool has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// A 16 x 16 block of floats, one row per register, transposed in registers: rows[i] holds column i after.
__attribute__((target("avx512f"))) inline void transpose_16x16(__m512 rows[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    rows[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    rows[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    rows[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    rows[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(rows[i], rows[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(rows[i], rows[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_f32x4(rows[8 + i], rows[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(rows[8 + i], rows[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    rows[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    rows[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
    rows[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
    rows[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xdd);
  }
}

// narrow_rows for float with 16 rows at a time in AVX-512 lanes (a's columns by 16 x 16 transposes where the
// shared dimension is a multiple of 16, else by gathers): the same operations per output, each lane's products
// and sums rounded as the scalar ones are.
template <int WIDTH>
__attribute__((target("avx512f"), optimize("fp-contract=off"))) void narrow_rows_avx512(const float* a, const float* b, int64_t b_row,
                                                                                        int64_t b_column, const float* start,
                                                                                        int64_t start_column, float* out, int64_t rows,
                                                                                        int64_t inner) {
  const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int>(inner)));
  int64_t r0 = 0;
  for (; r0 + 16 <= rows; r0 += 16) {
    __m512 acc[WIDTH];
    for (int j = 0; j < WIDTH; ++j) acc[j] = _mm512_set1_ps(start ? start[j * start_column] : 0.0f);
    const float* column = a + r0 * inner;
    if (inner % 16 == 0) {
      for (int64_t k0 = 0; k0 < inner; k0 += 16) {
        __m512 block[16];
        for (int t = 0; t < 16; ++t) block[t] = _mm512_loadu_ps(column + t * inner + k0);
        transpose_16x16(block);
        for (int kk = 0; kk < 16; ++kk)
          for (int j = 0; j < WIDTH; ++j)
            acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(block[kk], _mm512_set1_ps(b[(k0 + kk) * b_row + j * b_column])));
      }
    } else {
      for (int64_t k = 0; k < inner; ++k) {
        const __m512 v = _mm512_i32gather_ps(offsets, column + k, 4);
        for (int j = 0; j < WIDTH; ++j) acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(v, _mm512_set1_ps(b[k * b_row + j * b_column])));
      }
    }
    alignas(64) float lanes[WIDTH][16];
    for (int j = 0; j < WIDTH; ++j) _mm512_store_ps(lanes[j], acc[j]);
    for (int t = 0; t < 16; ++t)
      for (int j = 0; j < WIDTH; ++j) out[(r0 + t) * WIDTH + j] = lanes[j][t];
  }
  if (r0 < rows) narrow_rows<float>(a + r0 * inner, b, b_row, b_column, start, start_column, out + r0 * WIDTH, rows - r0, inner, WIDTH);
}

// out[r, :] = relu((the fused multiply-adds of a[r, k] b[k, :] over k in order, from zero) + start), for one
// contiguous (rows, inner) a and out, b's rows b_row apart and start, each contiguous along width: each output's
// operations as the scalar ones. The ReLU as ATen's (a < 0 ? 0 : a, NaN kept): max returns its second operand on
// a NaN.
__attribute__((target("avx512f"), optimize("fp-contract=off"))) void narrow_input_avx512(const float* a, const float* b, int64_t b_row,
                                                                                         const float* start, float* out, int64_t rows,
                                                                                         int64_t inner, int64_t width) {
  const int64_t whole = width / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (width - whole)) - 1u);
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = a + r * inner;
    float* o = out + r * width;
    for (int64_t h = 0; h < width; h += 16) {
      const __mmask16 mask = h < whole ? static_cast<__mmask16>(0xFFFF) : tail;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < inner; ++k) acc = _mm512_fmadd_ps(_mm512_set1_ps(ar[k]), _mm512_maskz_loadu_ps(mask, b + k * b_row + h), acc);
      const __m512 pre = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, start + h));
      _mm512_mask_storeu_ps(o + h, mask, _mm512_max_ps(_mm512_setzero_ps(), pre));
    }
  }
}
#endif

// Whether the input kinds' loop exists here for this dtype (float32 with AVX-512).
bool input_loop_runs(at::ScalarType dtype) {
#ifdef NARROW_AVX512
  return dtype == at::kFloat && has_avx512();
#else
  return false;
#endif
}

template <typename scalar_t>
void narrow_rows_fast(const scalar_t* a, const scalar_t* b, int64_t b_row, int64_t b_column, const scalar_t* start, int64_t start_column,
                      scalar_t* out, int64_t rows, int64_t inner, int64_t width) {
#ifdef NARROW_AVX512
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (has_avx512()) {
      switch (width) {
        case 1: return narrow_rows_avx512<1>(a, b, b_row, b_column, start, start_column, out, rows, inner);
        case 2: return narrow_rows_avx512<2>(a, b, b_row, b_column, start, start_column, out, rows, inner);
        case 3: return narrow_rows_avx512<3>(a, b, b_row, b_column, start, start_column, out, rows, inner);
        case 4: return narrow_rows_avx512<4>(a, b, b_row, b_column, start, start_column, out, rows, inner);
        default: break;
      }
    }
  }
#endif
  narrow_rows<scalar_t>(a, b, b_row, b_column, start, start_column, out, rows, inner, width);
}

// acc[j, k] += sum_r a[r, j] b[r, k] over r in order, for (rows, width) a and (rows, inner) b and (width, inner) acc,
// all contiguous: the weight gradients' products, vectorized along k.
template <typename scalar_t>
VECTORIZED void narrow_accumulate(const scalar_t* a, const scalar_t* b, scalar_t* acc, int64_t rows, int64_t width, int64_t inner) {
  NO_FP_CONTRACT_BODY
  for (int64_t j = 0; j < width; ++j) {
    scalar_t* row = acc + j * inner;
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t v = a[r * width + j];
      const scalar_t* br = b + r * inner;
      for (int64_t k = 0; k < inner; ++k) row[k] += v * br[k];
    }
  }
}

// x = relu(x) in place as ATen's (x < 0 ? 0 : x: -0 and NaN kept), all contiguous.
template <typename scalar_t>
VECTORIZED void relu_in_place(scalar_t* x, int64_t count) {
  NO_FP_CONTRACT_BODY
  for (int64_t e = 0; e < count; ++e) x[e] = x[e] < scalar_t(0) ? scalar_t(0) : x[e];
}

// The loop for a kind over its seeds, a and out contiguous, b and start through their strides. kBmm: out = a b per
// seed; kAccumulate: out (S, N, inner) += a^T b with a (S, rows, N), b (S, rows, inner), all contiguous; the input
// kinds: out = relu(start + a b) (start (N,) for one model, (S, 1, N) per seed); the output kinds: a = relu(a) in
// place, then out = start + a b.
template <typename scalar_t>
void narrow_run(NarrowKind kind, const Tensor& start, const Tensor& a, const Tensor& b, Tensor& out) {
  const bool batched = batched_kind(kind);
  const int64_t seeds = batched ? a.size(0) : 1, rows = a.size(-2);
  const scalar_t* pa = a.data_ptr<scalar_t>();
  const scalar_t* pb = b.data_ptr<scalar_t>();
  scalar_t* po = out.data_ptr<scalar_t>();
  if (kind == NarrowKind::kAccumulate) {
    const int64_t width = a.size(-1), inner = b.size(-1);
    for (int64_t s = 0; s < seeds; ++s)
      narrow_accumulate<scalar_t>(pa + s * rows * width, pb + s * rows * inner, po + s * width * inner, rows, width, inner);
    return;
  }
  const int64_t inner = a.size(-1), width = b.size(-1);
  const Placement pb_at = placement_of(b, batched);
  const scalar_t* ps = start.defined() ? start.data_ptr<scalar_t>() : nullptr;
  const Placement ps_at = start.defined() ? placement_of(start, batched) : Placement{0, 0, 0};
  if (input_kind(kind)) {
#ifdef NARROW_AVX512
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (int64_t s = 0; s < seeds; ++s)
        narrow_input_avx512(pa + s * rows * inner, pb + s * pb_at.seed, pb_at.row, ps + s * ps_at.seed, po + s * rows * width, rows, inner,
                            width);
      return;
    }
#endif
    TORCH_INTERNAL_ASSERT(false, "the input layer's loop runs with AVX-512 in float32 only");
  }
  if (output_kind(kind)) relu_in_place<scalar_t>(const_cast<scalar_t*>(pa), a.numel());
  for (int64_t s = 0; s < seeds; ++s)
    narrow_rows_fast<scalar_t>(pa + s * rows * inner, pb + s * pb_at.seed, pb_at.row, pb_at.column, ps ? ps + s * ps_at.seed : nullptr,
                               ps_at.column, po + s * rows * width, rows, inner, width);
}

// ATen's call that the loop for this kind replaces, into out where the solve's call writes into a buffer.
Tensor narrow_aten(NarrowKind kind, const Tensor& start, const Tensor& a, const Tensor& b, const Tensor& acc, Tensor& out) {
  switch (kind) {
    case NarrowKind::kBmm: return at::bmm(a, b);
    case NarrowKind::kInputAddmm: return at::addmm_out(out, start, a, b).relu_();
    case NarrowKind::kInputBaddbmm: return at::baddbmm_out(out, start, a, b).relu_();
    case NarrowKind::kOutputAddmm: return at::addmm(start, a.relu_(), b);
    case NarrowKind::kOutputBaddbmm: return at::baddbmm(start, a.relu_(), b);
    default: return acc.clone().baddbmm_(a.transpose(-1, -2), b);
  }
}

// A tensor of t's sizes, strides and dtype starting as far past a 64-byte boundary as t does, standard normal values.
Tensor placed_like(const Tensor& t, const at::Generator& generator) {
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  const int64_t misalignment = misalignment_of(t);
  return at::randn({misalignment + std::max<int64_t>(extent, 0)}, generator, t.options()).as_strided(t.sizes(), t.strides(), misalignment);
}

// Whether the loop for this call gives ATen's bits: checked once per process for each kind, dtype, shape, the
// operands' strides and alignment, thread count and float32 matmul precision (see above), on pseudo-random
// operands laid out as these are (twice: plain, then with inputs half zero as after a ReLU, a NaN and, for the
// output layer, negative zeros).
bool narrow_checked(NarrowKind kind, const Tensor& start, const Tensor& a, const Tensor& b, const Tensor& out) {
  // The key on the stack (every call builds one: a few per evaluation), answered from this thread's own copy of
  // the answers where it can, else from the process's under its lock.
  using Key = std::array<int64_t, 40>;
  Key key{};
  size_t n = 0;
  key[n++] = static_cast<int64_t>(kind);
  key[n++] = static_cast<int64_t>(a.scalar_type());
  key[n++] = at::get_num_threads();
  key[n++] = static_cast<int64_t>(at::globalContext().float32MatmulPrecision());
  for (const Tensor* t : {&start, &a, &b, &out}) {
    if (!t->defined() || t->dim() > 3) {
      key[n++] = -1;
      continue;
    }
    key[n++] = t->dim();
    for (int64_t d = 0; d < t->dim(); ++d) {
      key[n++] = t->size(d);
      key[n++] = t->stride(d);
    }
    key[n++] = misalignment_of(*t);
  }
  thread_local std::map<Key, bool> answered;
  const auto mine = answered.find(key);
  if (mine != answered.end()) return mine->second;
  static std::mutex lock;
  static std::map<Key, bool> known;
  const std::lock_guard<std::mutex> guard(lock);
  const auto found = known.find(key);
  if (found != known.end()) return answered.emplace(key, found->second).first->second;
  const at::Generator generator = at::detail::createCPUGenerator(12345);
  const int64_t rows = a.size(-2);
  bool same = true;
  for (int round = 0; round < 2 && same; ++round) {
    Tensor a_loop = placed_like(a, generator), b_loop = placed_like(b, generator);
    Tensor start_loop = start.defined() ? placed_like(start, generator) : Tensor();
    Tensor acc = kind == NarrowKind::kAccumulate ? placed_like(out, generator) : Tensor();
    if (round == 1) {
      (kind == NarrowKind::kAccumulate ? b_loop : a_loop).clamp_min_(0);
      if ((input_kind(kind) || output_kind(kind)) && rows >= 2) {
        a_loop.select(-2, 0).fill_(output_kind(kind) ? -0.0 : 0.0);
        a_loop.select(-2, 1).select(-1, 0).fill_(std::numeric_limits<double>::quiet_NaN());
      }
    }
    // ATen's call on copies placed as the solve's operands (its ReLU may change a; the input layer's writes out).
    Tensor a_aten = placed_like(a, generator).copy_(a_loop);
    Tensor out_aten = input_kind(kind) ? placed_like(out, generator) : Tensor();
    const Tensor expected = narrow_aten(kind, start_loop, a_aten, b_loop, acc, out_aten);
    Tensor out_loop = kind == NarrowKind::kAccumulate ? placed_like(out, generator).copy_(acc)
                      : input_kind(kind)            ? placed_like(out, generator)
                                                    : at::empty_like(expected);
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "narrow_check", [&] { narrow_run<scalar_t>(kind, start_loop, a_loop, b_loop, out_loop); });
    // Bit for bit (NaN included): the values as integers of their width.
    const at::ScalarType bits = a.scalar_type() == at::kFloat ? at::kInt : at::kLong;
    same = at::equal(out_loop.contiguous().view(bits), expected.contiguous().view(bits)) &&
           at::equal(a_loop.contiguous().view(bits), a_aten.contiguous().view(bits));
  }
  known.emplace(key, same);
  answered.emplace(key, same);
  return same;
}

// The loop for one of the narrow products where its check passed (else false, out untouched): kBmm and the output
// kinds into a new out; kAccumulate into out, the accumulator; the input kinds into out, the layer's buffer.
// Takes float32 and float64 on CPU (the input kinds float32 with AVX-512): a, out and kAccumulate's b contiguous,
// the weights and biases through their strides (the input kinds': contiguous along the hidden units).
bool narrow_product(NarrowKind kind, const Tensor& start, const Tensor& a, const Tensor& b, Tensor& out) {
  const at::ScalarType dtype = a.scalar_type();
  if (!narrow_products_enabled.load(std::memory_order_relaxed) || (input_kind(kind) && !input_loop_runs(dtype)))
    return counted(kind, kNoLoop);
  const bool batched = batched_kind(kind);
  if (!(plain_loops_take(a) && b.scalar_type() == dtype && b.device().is_cpu() && a.is_contiguous() && a.dim() == (batched ? 3 : 2) &&
        b.dim() == a.dim() && (!batched || a.size(0) == b.size(0)) && a.size(-2) > 0))
    return counted(kind, kNotTheLoops);
  const int64_t seeds = batched ? a.size(0) : 1, rows = a.size(-2);
  if (kind == NarrowKind::kAccumulate) {
    if (!(b.is_contiguous() && a.size(-2) == b.size(-2) && a.size(-1) <= kNarrowWidth && out.defined() && out.scalar_type() == dtype &&
          out.device().is_cpu() && out.is_contiguous() && out.dim() == 3 && out.size(0) == seeds && out.size(1) == a.size(-1) &&
          out.size(2) == b.size(-1)))
      return counted(kind, kNotTheLoops);
  } else {
    const int64_t inner = a.size(-1), width = b.size(-1);
    bool fits = a.size(-1) == b.size(-2) && (input_kind(kind) ? inner : width) <= kNarrowWidth;
    if (kind == NarrowKind::kBmm) {
      fits = fits && !start.defined();
    } else {
      fits = fits && start.defined() && start.scalar_type() == dtype && start.device().is_cpu() &&
             (batched ? start.dim() == 3 && start.size(0) == seeds && start.size(1) == 1 && start.size(2) == width
                      : start.dim() == 1 && start.size(0) == width);
    }
    if (input_kind(kind))
      fits = fits && b.stride(-1) == 1 && start.stride(-1) == 1 && out.defined() && out.scalar_type() == dtype && out.device().is_cpu() &&
             out.is_contiguous() && out.dim() == a.dim() && out.size(-2) == rows && out.size(-1) == width &&
             (!batched || out.size(0) == seeds);
    if (!fits) return counted(kind, kNotTheLoops);
  }
  if (!narrow_checked(kind, start, a, b, out)) return counted(kind, kCheckFailed);
  if (kind == NarrowKind::kBmm || output_kind(kind))
    out = at::empty(batched ? std::vector<int64_t>{seeds, rows, b.size(-1)} : std::vector<int64_t>{rows, b.size(-1)}, a.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "narrow_product", [&] { narrow_run<scalar_t>(kind, start, a, b, out); });
  return counted(kind, kTaken);
}

// k = f(z) as dense_field computes it: addmm for one model, baddbmm for stacked seeds (the input and output
// layers, each with its ReLU, as narrow_product where its check passed).
Tensor field_eval(const Tensor& z, const std::vector<Tensor>& w, Tensor& h1, Tensor h2, bool stacked) {
  if (stacked) {
    if (!narrow_product(NarrowKind::kInputBaddbmm, w[1], z, w[0], h1)) at::baddbmm_out(h1, w[1], z, w[0]).relu_();
    at::baddbmm_out(h2, w[3], h1, w[2]);
    Tensor out;
    if (narrow_product(NarrowKind::kOutputBaddbmm, w[5], h2, w[4], out)) return out;
    return at::baddbmm(w[5], h2.relu_(), w[4]);
  }
  if (!narrow_product(NarrowKind::kInputAddmm, w[1], z, w[0], h1)) at::addmm_out(h1, w[1], z, w[0]).relu_();
  at::addmm_out(h2, w[3], h1, w[2]);
  Tensor out;
  if (narrow_product(NarrowKind::kOutputAddmm, w[5], h2, w[4], out)) return out;
  return at::addmm(w[5], h2.relu_(), w[4]);
}

// The output layer's backward pass for a narrow state in one loop over (S, B, H): gh2 =
// threshold_backward(g W3^T, h2, 0) (the product as above), gc3 += g and gc2 += gh2 (the biases'
// gradients per batch row): the IEEE operations of the ATen calls field_backward otherwise makes,
// in the same order (threshold_backward: 0 where h2 <= 0, else the gradient). All contiguous but
// W3^T; WIDTH: the state's columns where known at compile time (0: width).
template <typename scalar_t, int WIDTH>
VECTORIZED void output_layer_backward(const Tensor& g_t, const Tensor& w3t_t, const Tensor& h2_t, Tensor& gh2_t, Tensor& gc3_t,
                                      Tensor& gc2_t) {
  NO_FP_CONTRACT_BODY
  const int64_t seeds = g_t.size(0), rows = g_t.size(1), width = WIDTH > 0 ? WIDTH : g_t.size(2), hidden = h2_t.size(2);
  const scalar_t* g = g_t.data_ptr<scalar_t>();
  const scalar_t* h2 = h2_t.data_ptr<scalar_t>();
  scalar_t* gh2 = gh2_t.data_ptr<scalar_t>();
  scalar_t* gc3 = gc3_t.data_ptr<scalar_t>();
  scalar_t* gc2 = gc2_t.data_ptr<scalar_t>();
  for (int64_t i = 0; i < seeds * rows * width; ++i) gc3[i] = gc3[i] + g[i];
  std::vector<scalar_t> w3(width * hidden);  // the seed's W3^T, contiguous
  for (int64_t s = 0; s < seeds; ++s) {
    const scalar_t* w3s = w3t_t.data_ptr<scalar_t>() + s * w3t_t.stride(0);
    const int64_t k_stride = w3t_t.stride(1), j_stride = w3t_t.stride(2);
    for (int64_t k = 0; k < width; ++k)
      for (int64_t j = 0; j < hidden; ++j) w3[k * hidden + j] = w3s[k * k_stride + j * j_stride];
    const scalar_t* __restrict__ w = w3.data();
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t row = s * rows + b;
      const scalar_t* __restrict__ g_row = g + row * width;
      const scalar_t* __restrict__ h_row = h2 + row * hidden;
      scalar_t* __restrict__ out = gh2 + row * hidden;
      scalar_t* __restrict__ sum = gc2 + row * hidden;
      if (WIDTH == 2) {
        const scalar_t g0 = g_row[0], g1 = g_row[1];
        const scalar_t* __restrict__ w0 = w;
        const scalar_t* __restrict__ w1 = w + hidden;
        for (int64_t j = 0; j < hidden; ++j) out[j] = g0 * w0[j] + g1 * w1[j];
      } else {
        for (int64_t j = 0; j < hidden; ++j) out[j] = g_row[0] * w[j];
        for (int64_t k = 1; k < width; ++k)
          for (int64_t j = 0; j < hidden; ++j) out[j] = out[j] + g_row[k] * w[k * hidden + j];
      }
      // threshold_backward, then the bias gradient (a separate pass: a select after arithmetic in
      // one loop is not vectorized by GCC).
      for (int64_t j = 0; j < hidden; ++j) {
        const scalar_t v = h_row[j] <= 0 ? scalar_t(0) : out[j];
        out[j] = v;
        sum[j] = sum[j] + v;
      }
    }
  }
}

// gh1 = threshold_backward(gh1, h1, 0) in place and gc1 += gh1 in one loop (all contiguous).
template <typename scalar_t>
VECTORIZED void hidden_layer_backward(Tensor& gh1_t, const Tensor& h1_t, Tensor& gc1_t) {
  NO_FP_CONTRACT_BODY
  scalar_t* __restrict__ gh1 = gh1_t.data_ptr<scalar_t>();
  const scalar_t* __restrict__ h1 = h1_t.data_ptr<scalar_t>();
  scalar_t* __restrict__ gc1 = gc1_t.data_ptr<scalar_t>();
  const int64_t numel = gh1_t.numel();
  for (int64_t i = 0; i < numel; ++i) {
    const scalar_t v = h1[i] <= 0 ? scalar_t(0) : gh1[i];
    gh1[i] = v;
    gc1[i] = gc1[i] + v;
  }
}

// w: W1, c1 (S,1,H), W1t, W2t, W3t; acc: gW1, gW2, gW3t, the biases' gradients per batch row
// gc1, gc2, gc3 (S,B,.), summed over the rows once at the end (one addition per evaluation
// instead of a sum and an addition), then scratch hidden, first. Returns dL/dz of k = f(z) given
// dL/dk = g, with h1 and h2 the hidden layers (after ReLU) the forward pass kept. A narrow state's
// output layer product is elementwise (kNarrowWidth), and on CPU in float32 and float64 the
// elementwise steps run as the two loops above (the same operations as the ATen calls).
Tensor field_backward(const Tensor& g, const Tensor& z, const Tensor& h1, const Tensor& h2, const std::vector<Tensor>& w,
                      const std::vector<Tensor>& acc) {
  Tensor gW1 = acc[0], gW2 = acc[1], gW3t = acc[2], gc1 = acc[3], gc2 = acc[4], gc3 = acc[5];
  Tensor hidden = acc[6], first = acc[7];
  if (!narrow_product(NarrowKind::kAccumulate, Tensor(), g, h2, gW3t)) gW3t.baddbmm_(g.transpose(-1, -2), h2);
  const int64_t width = g.size(-1);
  const bool narrow = width <= kNarrowWidth;
  bool loops = narrow && plain_loops_take(g) && g.dim() == 3;
  for (const Tensor* t : std::initializer_list<const Tensor*>{&z, &h1, &h2, &w[4], &hidden, &first, &gc1, &gc2, &gc3})
    loops = loops && t->dim() == 3 && t->device() == g.device() && t->scalar_type() == g.scalar_type();
  for (const Tensor* t : std::initializer_list<const Tensor*>{&g, &h1, &h2, &hidden, &first, &gc1, &gc2, &gc3})
    loops = loops && t->is_contiguous();
  Tensor gh = hidden;
  if (loops) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "output_layer_backward", [&] {
      if (width == 2) {
        output_layer_backward<scalar_t, 2>(g, w[4], h2, hidden, gc3, gc2);
      } else {
        output_layer_backward<scalar_t, 0>(g, w[4], h2, hidden, gc3, gc2);
      }
    });
  } else {
    gc3.add_(g);
    if (narrow) {
      at::mul_out(gh, g.narrow(-1, 0, 1), w[4].narrow(-2, 0, 1));
      for (int64_t k = 1; k < width; ++k) gh.add_(g.narrow(-1, k, 1) * w[4].narrow(-2, k, 1));
    } else {
      at::bmm_out(gh, g, w[4]);
    }
    at::threshold_backward_out(gh, gh, h2, 0);
    gc2.add_(gh);
  }
  gW2.baddbmm_(h1.transpose(-1, -2), gh);
  gh = at::bmm_out(first, gh, w[3]);
  if (loops) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "hidden_layer_backward", [&] { hidden_layer_backward<scalar_t>(gh, h1, gc1); });
  } else {
    at::threshold_backward_out(gh, gh, h1, 0);
    gc1.add_(gh);
  }
  if (!narrow_product(NarrowKind::kAccumulate, Tensor(), z, gh, gW1)) gW1.baddbmm_(z.transpose(-1, -2), gh);
  Tensor gz;
  if (narrow_product(NarrowKind::kBmm, Tensor(), gh, w[2], gz)) return gz;
  return at::bmm(gh, w[2]);
}

// (error / (max(|y|, |y1|) * rtol + atol)).abs().pow(2), as attempt_forward's ATen calls compute
// it (at::maximum propagates NaN; pow(2) is x * x), into a new contiguous tensor shaped like error.
template <typename scalar_t>
NO_FP_CONTRACT void scaled_error_squares(const Tensor& error, const Tensor& y, const Tensor& y1, double rtol, double atol, Tensor& out) {
  NO_FP_CONTRACT_BODY
  const Strided<scalar_t> e(error), a(y), b(y1);
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t seeds = error.dim() == 2 ? 1 : error.size(0), rows = error.size(-2), columns = error.size(-1);
  const scalar_t r = static_cast<scalar_t>(rtol), t = static_cast<scalar_t>(atol);
  for (int64_t s = 0; s < seeds; ++s)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < columns; ++j) {
        const scalar_t u = std::abs(a(s, i, j)), v = std::abs(b(s, i, j));
        const scalar_t larger = u != u ? u : (v != v ? v : (u > v ? u : v));
        const scalar_t q = std::abs(e(s, i, j) / (larger * r + t));
        *o++ = q * q;
      }
}

Tensor error_squares(const Tensor& error, const Tensor& y, const Tensor& y1, double rtol, double atol) {
  if (!(plain_loops_take(error) && error.scalar_type() == y.scalar_type() && y.scalar_type() == y1.scalar_type() &&
        error.sizes() == y.sizes() && y.sizes() == y1.sizes() && error.is_contiguous()))
    return (error / at::add(at::mul(at::maximum(y.abs(), y1.abs()), rtol), atol)).abs().pow(2);
  Tensor out = at::empty_like(error, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(error.scalar_type(), "error_squares", [&] { scaled_error_squares<scalar_t>(error, y, y1, rtol, atol, out); });
  return out;
}

// The interpolant's polynomial of interpolate_at (its ATen calls' operations in their order) with
// per-seed x and dt already in the states' dtype (one value for S = 1).
template <typename scalar_t>
NO_FP_CONTRACT void interpolant_loop(const Tensor& y0_t, const Tensor& y1_t, const Tensor& ym_t, const Tensor& f0_t, const Tensor& f1_t,
                                     const std::vector<double>& x_seed, const std::vector<double>& dt_seed, Tensor& out) {
  NO_FP_CONTRACT_BODY
  const Strided<scalar_t> y0(y0_t), y1(y1_t), ym(ym_t), f0(f0_t), f1(f1_t);
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t seeds = y0_t.dim() == 2 ? 1 : y0_t.size(0), rows = y0_t.size(-2), columns = y0_t.size(-1);
  const scalar_t two = 2, three = 3, four = 4, five = 5, eight = 8, eleven = 11, fourteen = 14, sixteen = 16, eighteen = 18,
                 thirty_two = 32;
  for (int64_t s = 0; s < seeds; ++s) {
    const scalar_t x = static_cast<scalar_t>(x_seed[s]), dt = static_cast<scalar_t>(dt_seed[s]);
    const scalar_t dt2 = dt * two, x2 = x * x, x3 = x2 * x, x4 = x3 * x;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < columns; ++j) {
        const scalar_t v0 = y0(s, i, j), v1 = y1(s, i, j), vm = ym(s, i, j), k0 = f0(s, i, j), k1 = f1(s, i, j);
        const scalar_t a = (dt2 * (k1 - k0) - (v1 + v0) * eight) + vm * sixteen;
        const scalar_t b = ((dt * (k0 * five - k1 * three) + v0 * eighteen) + v1 * fourteen) - vm * thirty_two;
        const scalar_t c = ((dt * (k1 - k0 * four) - v0 * eleven) - v1 * five) + vm * sixteen;
        const scalar_t d = dt * k0;
        *o++ = (((v0 + x * d) + x2 * c) + x3 * b) + x4 * a;
      }
  }
}

// |(top - minus) / scale|^2 (without minus: |top / scale|^2) with scale = |y0| * rtol + atol, as
// first_step_forward's ATen calls compute it, into a new contiguous tensor shaped like y0.
template <typename scalar_t>
NO_FP_CONTRACT void scaled_squares(const Tensor& y0_t, const Tensor& top_t, const Tensor* minus_t, double rtol, double atol, Tensor& out) {
  NO_FP_CONTRACT_BODY
  const Strided<scalar_t> y0(y0_t), top(top_t), minus(minus_t ? *minus_t : top_t);
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t seeds = y0_t.dim() == 2 ? 1 : y0_t.size(0), rows = y0_t.size(-2), columns = y0_t.size(-1);
  const scalar_t r = static_cast<scalar_t>(rtol), t = static_cast<scalar_t>(atol);
  for (int64_t s = 0; s < seeds; ++s)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < columns; ++j) {
        const scalar_t scale = std::abs(y0(s, i, j)) * r + t;
        const scalar_t q = std::abs((minus_t ? top(s, i, j) - minus(s, i, j) : top(s, i, j)) / scale);
        *o++ = q * q;
      }
}

// y0 + h0 * f0 with h0 per seed (one value for S = 1), into a new contiguous tensor.
template <typename scalar_t>
NO_FP_CONTRACT void trial_state(const Tensor& y0_t, const Tensor& f0_t, const Tensor& h0_t, Tensor& out) {
  NO_FP_CONTRACT_BODY
  const Strided<scalar_t> y0(y0_t), f0(f0_t);
  const Tensor h0_values = h0_t.contiguous();
  const scalar_t* h0 = h0_values.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t seeds = y0_t.dim() == 2 ? 1 : y0_t.size(0), rows = y0_t.size(-2), columns = y0_t.size(-1);
  for (int64_t s = 0; s < seeds; ++s)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < columns; ++j) *o++ = y0(s, i, j) + h0[s] * f0(s, i, j);
}

}  // namespace

Tensor bool_tensor(const std::vector<bool>& values, const at::Device& device);

namespace {

// h_t.to(dtype) * coefficients laid out per seed, as a loop rather than three ATen calls an attempt: each
// product is the same IEEE multiplication of the step size rounded to the dtype.
template <typename scalar_t>
NO_FP_CONTRACT void step_weights_loop(const double* h, int64_t seeds, const Tensor& coefficients, Tensor& out) {
  NO_FP_CONTRACT_BODY
  const scalar_t* c = coefficients.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t per_seed = coefficients.numel();
  for (int64_t s = 0; s < seeds; ++s) {
    const scalar_t step = static_cast<scalar_t>(h[s]);
    for (int64_t e = 0; e < per_seed; ++e) *o++ = step * c[e];
  }
}

// The step sizes times the coefficient rows, per seed ((S, 1, 1, rows, n); one model: (rows, n) from a
// 0-dim step size).
Tensor step_weights(const Tensor& h_t, const Tensor& coefficients, const Tensor& y, bool stacked) {
  if (plain_loops_take(y) && h_t.scalar_type() == at::kDouble && h_t.device().is_cpu() && h_t.dim() == 1 &&
      coefficients.scalar_type() == y.scalar_type() && coefficients.device() == y.device() && coefficients.dim() == 2 &&
      (stacked || h_t.numel() == 1)) {
    const Tensor h_values = h_t.contiguous(), rows = coefficients.contiguous();
    const int64_t seeds = h_values.numel();
    Tensor out = stacked ? at::empty({seeds, 1, 1, rows.size(0), rows.size(1)}, rows.options()) : at::empty_like(rows);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "step_weights",
                               [&] { step_weights_loop<scalar_t>(h_values.data_ptr<double>(), seeds, rows, out); });
    return out;
  }
  const Tensor h = h_t.to(y.scalar_type());
  return (stacked ? h.view({-1, 1, 1, 1, 1}) : h.view(std::vector<int64_t>{})) * coefficients;
}

// y + (ks[..., :terms] * weights[..., row, :terms]).sum(-1) (without y: the sum alone) as a loop. ATen sums a
// contiguous last dimension shorter than its SIMD width (the width this file is compiled for is at most the one
// its kernel runs at) with four accumulators starting at zero, term j into accumulator j % 4 while whole groups
// of four last and the rest into the first, then the four added in order (SumKernel.cpp's row_sum; its
// hierarchical levels start at 64 terms): the same operations here, each product rounded first. The
// accumulators start at +0 as ATen's do, which is why a sum of negative zeros is +0 either way.
template <typename scalar_t>
NO_FP_CONTRACT void weighted_sum_loop(const Tensor* y_t, const Tensor& ks_t, const Tensor& weights_t, int64_t row, int64_t terms,
                                      Tensor& out_t) {
  NO_FP_CONTRACT_BODY
  const bool single = out_t.dim() == 2;
  const int64_t seeds = single ? 1 : out_t.size(0), rows = out_t.size(-2), columns = out_t.size(-1);
  const scalar_t* k = ks_t.data_ptr<scalar_t>();
  const int64_t k_seed = single ? 0 : ks_t.stride(0), k_row = ks_t.stride(-3), k_column = ks_t.stride(-2);
  const int64_t w_seed = single ? 0 : weights_t.size(-2) * weights_t.size(-1);
  const scalar_t* w = weights_t.data_ptr<scalar_t>() + row * weights_t.size(-1);
  scalar_t* o = out_t.data_ptr<scalar_t>();
  const int64_t o_seed = single ? 0 : out_t.stride(0), o_row = out_t.stride(-2), o_column = out_t.stride(-1);
  const std::optional<Strided<scalar_t>> y = y_t ? std::optional<Strided<scalar_t>>(Strided<scalar_t>(*y_t)) : std::nullopt;
  const int64_t grouped = terms / 4 * 4;
  for (int64_t s = 0; s < seeds; ++s) {
    const scalar_t* c = w + s * w_seed;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < columns; ++j) {
        const scalar_t* kij = k + s * k_seed + i * k_row + j * k_column;
        scalar_t acc[4] = {0, 0, 0, 0};
        for (int64_t t = 0; t < grouped; t += 4)
          for (int64_t a = 0; a < 4; ++a) acc[a] += kij[t + a] * c[t + a];
        for (int64_t t = grouped; t < terms; ++t) acc[0] += kij[t] * c[t];
        const scalar_t sum = ((acc[0] + acc[1]) + acc[2]) + acc[3];
        o[s * o_seed + i * o_row + j * o_column] = y ? (*y)(s, i, j) + sum : sum;
      }
  }
}

// Whether weighted_sum_loop gives ATen's bits for this many terms (checked once per process on pseudo-random
// values against ATen's calls: the order is an ATen internal, which a PyTorch release may change).
template <typename scalar_t>
bool sum_order_checked(int64_t terms) {
  static std::mutex lock;
  static std::map<int64_t, bool> known;
  const std::lock_guard<std::mutex> guard(lock);
  const auto found = known.find(terms);
  if (found != known.end()) return found->second;
  const at::Generator generator = at::detail::createCPUGenerator(54321);
  const at::TensorOptions options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const Tensor ks = at::randn({3, 16, 2, terms}, generator, options), weights = at::randn({3, 1, 1, 1, terms}, generator, options);
  const Tensor y = at::randn({3, 16, 2}, generator, options);
  const Tensor expected = at::add(y, at::sum(ks * weights.select(-2, 0), {-1}));
  Tensor out = at::empty_like(y);
  weighted_sum_loop<scalar_t>(&y, ks, weights, 0, terms, out);
  const at::ScalarType bits = std::is_same_v<scalar_t, float> ? at::kInt : at::kLong;
  const bool same = at::equal(out.view(bits), expected.view(bits));
  known.emplace(terms, same);
  return same;
}

// weighted_sum_loop into out where it takes these (same dtype on CPU, ks's stages contiguous, weights laid out
// per seed as step_weights makes them, fewer terms than the SIMD width); false where the ATen calls are to run.
bool weighted_sum(const Tensor* y, const Tensor& ks, const Tensor& weights, int64_t row, int64_t terms, bool stacked, Tensor& out) {
  const at::ScalarType dtype = ks.scalar_type();
  if (!(plain_loops_take(ks) && weights.scalar_type() == dtype && out.scalar_type() == dtype && (!y || y->scalar_type() == dtype) &&
        weights.device().is_cpu() && out.device().is_cpu() && (!y || y->device().is_cpu()) && ks.stride(-1) == 1 &&
        weights.is_contiguous() && ks.dim() == (stacked ? 4 : 3) && weights.dim() == (stacked ? 5 : 2) && out.dim() == ks.dim() - 1 &&
        (!y || y->sizes() == out.sizes()) && ks.sizes().slice(0, ks.dim() - 1) == out.sizes() &&
        (!stacked || (weights.size(0) == ks.size(0) && weights.size(1) == 1 && weights.size(2) == 1)) && row >= 0 &&
        row < weights.size(-2) && terms > 0 && terms <= weights.size(-1) && terms <= ks.size(-1)))
    return false;
  bool taken = false;
  AT_DISPATCH_FLOATING_TYPES(dtype, "weighted_sum", [&] {
    if (terms < static_cast<int64_t>(at::vec::Vectorized<scalar_t>::size()) && sum_order_checked<scalar_t>(terms)) {
      weighted_sum_loop<scalar_t>(y, ks, weights, row, terms, out);
      taken = true;
    }
  });
  return taken;
}

// One attempt's stages: fills zs, h1s, h2s, ks (and y1_buffer for non-FSAL pairs); returns the
// step's solution, with atol the mean of IController's scaled squared errors per seed (its error
// ratio is their root; else the error estimate), and the step sizes times the coefficient rows.
std::vector<Tensor> attempt_stages(const Tensor& y, const Tensor& f0, const Tensor& h_t, const Tensor& coefficients,
                                   const std::vector<Tensor>& w, const Tensor& zs, const Tensor& h1s, const Tensor& h2s,
                                   const Tensor& ks, const Tensor& y1_buffer, bool stacked, bool fsal, int64_t row_b,
                                   int64_t row_err, std::optional<double> atol, double rtol, bool seeded) {
  const int64_t n = ks.size(-1);
  const Tensor weights = step_weights(h_t, coefficients, y, stacked);
  ks.select(-1, 0).copy_(f0);
  for (int64_t i = 1; i < n; ++i) {
    Tensor zi = zs.select(0, i - 1);
    if (!weighted_sum(&y, ks, weights, i - 1, i, stacked, zi))
      at::add_out(zi, y, at::sum(ks.slice(-1, 0, i) * weights.select(-2, i - 1).slice(-1, 0, i), {-1}));
    Tensor h1 = h1s.select(0, i - 1);
    ks.select(-1, i).copy_(field_eval(zi, w, h1, h2s.select(0, i - 1), stacked));
  }
  Tensor y1 = fsal ? zs.select(0, n - 2) : y1_buffer;
  if (!fsal && !weighted_sum(&y, ks, weights, row_b, n, stacked, y1))
    at::add_out(y1, y, at::sum(ks * weights.select(-2, row_b), {-1}));
  Tensor error = at::empty(y.sizes(), y.options());
  if (!weighted_sum(nullptr, ks, weights, row_err, n, stacked, error)) error = at::sum(ks * weights.select(-2, row_err), {-1});
  if (!atol) return {y1, error, weights};
  Tensor x = error_squares(error, y, y1, rtol, *atol);
  return {y1, seeded ? x.flatten(1).mean(1) : x.mean(), weights};
}

// IController's error ratios from attempt_stages' means, as doubles: the roots by ATen (its float sqrt is not
// always the correctly rounded one, so a scalar sqrt would change bits), their absolute values and conversion
// (exact) by scalar code in float32 and float64 on CPU rather than two more ATen calls an attempt.
std::vector<double> error_ratios(const Tensor& means) {
  const Tensor roots = means.sqrt().reshape({-1});
  if (!(plain_loops_take(roots) && roots.is_contiguous())) return to_doubles(roots.abs());
  std::vector<double> ratios(roots.numel());
  AT_DISPATCH_FLOATING_TYPES(roots.scalar_type(), "error_ratios", [&] {
    const scalar_t* r = roots.data_ptr<scalar_t>();
    for (int64_t s = 0; s < roots.numel(); ++s) ratios[s] = static_cast<double>(std::abs(r[s]));
  });
  return ratios;
}

}  // namespace

// attempt_stages with IController's error ratio (a tensor) where atol is given, for the stepping from Python.
std::vector<Tensor> attempt_forward(const Tensor& y, const Tensor& f0, const Tensor& h_t, const Tensor& coefficients,
                                    const std::vector<Tensor>& w, const Tensor& zs, const Tensor& h1s, const Tensor& h2s,
                                    const Tensor& ks, const Tensor& y1_buffer, bool stacked, bool fsal, int64_t row_b,
                                    int64_t row_err, std::optional<double> atol, double rtol, bool seeded) {
  std::vector<Tensor> step = attempt_stages(y, f0, h_t, coefficients, w, zs, h1s, h2s, ks, y1_buffer, stacked, fsal, row_b, row_err,
                                            atol, rtol, seeded);
  if (atol) step[1] = step[1].sqrt().abs();
  return step;
}

namespace {

// Whether stage_adjoints takes these (else the ATen calls it replaces run).
bool stage_loop_takes(const Tensor& g_in, const Tensor& g_k, const Tensor& g_y, const Tensor* g_y1, const Tensor& wk) {
  bool take = plain_loops_take(g_in) && g_in.dim() == 3;
  for (const Tensor* t : std::initializer_list<const Tensor*>{&g_in, &g_k, &g_y, &wk})
    take = take && t->is_contiguous() && t->scalar_type() == g_in.scalar_type() && t->device() == g_in.device();
  if (g_y1) take = take && g_y1->is_contiguous() && g_y1->scalar_type() == g_in.scalar_type() && g_y1->device() == g_in.device();
  return take && g_y.sizes() == g_in.sizes() && g_k.size(1) == g_in.size(0) && g_k.numel() == g_k.size(0) * g_in.numel();
}

// One stage's adjoint updates after its evaluation's backward pass, as a loop: g_in += g_y1 (the
// FSAL stage), g_y += g_in (or g_y = g_in where fresh), and g_k[j] += g_in * wk[i-1, j] for the
// stages j < i (per seed factors): the IEEE operations of the ATen calls attempt_backward otherwise
// makes (add_, copy_, a product then add_), in the same order. g_k: (n, S, B, W); wk: (rows, n, S, 1, 1).
template <typename scalar_t>
VECTORIZED void stage_adjoints(Tensor& g_in_t, const Tensor* g_y1_t, Tensor& g_y_t, bool fresh, Tensor& g_k_t, const Tensor& wk_t,
                               int64_t i) {
  NO_FP_CONTRACT_BODY
  const int64_t seeds = g_in_t.size(0), per_seed = g_in_t.size(1) * g_in_t.size(2), numel = seeds * per_seed, n = wk_t.size(1);
  scalar_t* __restrict__ g_in = g_in_t.data_ptr<scalar_t>();
  scalar_t* __restrict__ g_y = g_y_t.data_ptr<scalar_t>();
  scalar_t* g_k = g_k_t.data_ptr<scalar_t>();
  const scalar_t* wk = wk_t.data_ptr<scalar_t>() + (i - 1) * n * seeds;
  if (g_y1_t) {
    const scalar_t* __restrict__ g_y1 = g_y1_t->data_ptr<scalar_t>();
    for (int64_t e = 0; e < numel; ++e) g_in[e] = g_in[e] + g_y1[e];
  }
  if (fresh) {
    for (int64_t e = 0; e < numel; ++e) g_y[e] = g_in[e];
  } else {
    for (int64_t e = 0; e < numel; ++e) g_y[e] = g_y[e] + g_in[e];
  }
  for (int64_t j = 0; j < i; ++j)
    for (int64_t s = 0; s < seeds; ++s) {
      const scalar_t factor = wk[j * seeds + s];
      const scalar_t* __restrict__ source = g_in + s * per_seed;
      scalar_t* __restrict__ target = g_k + j * numel + s * per_seed;
      for (int64_t e = 0; e < per_seed; ++e) target[e] = target[e] + source[e] * factor;
    }
}

}  // namespace

// dL/dh's terms per element of the first attempt's stage weights h * row: p = sum over the combinations c (in
// order) of combo_c * q_c, q_c = sum over the stages j (in order) of rows64[row_c, j] * k_j, in double precision
// from zero, each product then each sum rounded (PythonAttemptLoops.attempt_backward's tensor operations);
// summed over each seed's rows and columns (by ATen) it is dL/dh. combos (S, B, W), ks (S, B, W, n).
template <typename scalar_t>
NO_FP_CONTRACT void step_size_terms_loop(const std::vector<Tensor>& combos, const std::vector<int64_t>& rows, const Tensor& ks_t,
                                         const Tensor& rows64_t, Tensor& out_t) {
  NO_FP_CONTRACT_BODY
  const int64_t seeds = out_t.size(0), batch = out_t.size(1), columns = out_t.size(2), n = ks_t.size(-1);
  const Tensor rows64 = rows64_t.contiguous();
  const double* r = rows64.data_ptr<double>();
  std::vector<Strided<scalar_t>> c;
  for (const Tensor& combo : combos) c.emplace_back(combo);
  const scalar_t* k = ks_t.data_ptr<scalar_t>();
  const int64_t k_seed = ks_t.stride(0), k_row = ks_t.stride(1), k_column = ks_t.stride(2), k_stage = ks_t.stride(3);
  double* o = out_t.data_ptr<double>();
  for (int64_t s = 0; s < seeds; ++s)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t w = 0; w < columns; ++w) {
        const scalar_t* kk = k + s * k_seed + b * k_row + w * k_column;
        double p = 0.0;
        for (size_t i = 0; i < combos.size(); ++i) {
          const double* ri = r + rows[i] * n;
          double q = 0.0;
          for (int64_t j = 0; j < n; ++j) q = q + ri[j] * static_cast<double>(kk[j * k_stage]);
          p = p + static_cast<double>(c[i](s, b, w)) * q;
        }
        *o++ = p;
      }
}

Tensor step_size_terms(const std::vector<Tensor>& combos, const std::vector<int64_t>& rows, const Tensor& ks, const Tensor& rows64) {
  bool loops = plain_loops_take(ks) && ks.dim() == 4 && rows64.scalar_type() == at::kDouble && rows64.device().is_cpu() &&
               rows64.dim() == 2 && rows64.size(1) == ks.size(-1);
  for (int64_t row : rows) loops = loops && row >= 0 && row < rows64.size(0);
  for (const Tensor& combo : combos)
    loops = loops && combo.dim() == 3 && combo.scalar_type() == ks.scalar_type() && combo.device().is_cpu() &&
            combo.sizes() == ks.sizes().slice(0, 3);
  if (loops) {
    Tensor out = at::empty({ks.size(0), ks.size(1), ks.size(2)}, ks.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES(ks.scalar_type(), "step_size_terms", [&] { step_size_terms_loop<scalar_t>(combos, rows, ks, rows64, out); });
    return out;
  }
  const Tensor k = ks.to(at::kDouble);
  Tensor p = at::zeros(k.sizes().slice(0, 3), k.options());
  for (size_t i = 0; i < combos.size(); ++i) {
    Tensor q = at::zeros_like(p);
    for (int64_t j = 0; j < k.size(-1); ++j) q = q + rows64.select(0, rows[i]).select(0, j) * k.select(-1, j);
    p = p + combos[i].to(at::kDouble) * q;
  }
  return p;
}

// One kept attempt's backward pass (all (S, ., .); wk: the attempt's h * coefficient rows as
// (rows, stages, S, 1, 1)). interp: dL/d of the interpolant's start state, solution, midpoint,
// first and last stage outputs, or empty. Returns dL/dy and dL/df0 before the attempt and, on
// the first attempt, dL/dh per seed (float64) through its stage weights h * a (its solution's
// h * b for a non-FSAL pair, its midpoint's h * b_mid if it finished; rows64: the coefficient rows).
// Each stage's adjoint updates run as stage_adjoints' loop where it takes them. The whole solve's
// backward pass reads dL/dh of the first attempt only and leaves the others' undefined (no_zeros).
std::vector<Tensor> attempt_backward_of(const Tensor& gy, const Tensor& gf, const std::vector<bool>& accepted,
                                        const Tensor& weights, const Tensor& zs_in, const Tensor& h1s_in, const Tensor& h2s_in,
                                        const Tensor& ks_in,
                                        const std::vector<Tensor>& w, const std::vector<Tensor>& acc, bool fsal, int64_t row_b,
                                        int64_t row_mid, const std::vector<Tensor>& interp, bool first, const Tensor& rows64,
                                        bool no_zeros) {
  const int64_t seeds = gy.size(0), rows = rows64.size(0), n = rows64.size(1);
  const bool single = zs_in.dim() == 3;  // one model's buffers: seeds as a leading 1
  const Tensor zs = single ? zs_in.unsqueeze(1) : zs_in, h2s = single ? h2s_in.unsqueeze(1) : h2s_in;
  const Tensor h1s = single ? h1s_in.unsqueeze(1) : h1s_in, ks = single ? ks_in.unsqueeze(0) : ks_in;
  const Tensor wk = weights.reshape({seeds, rows, n}).permute({1, 2, 0}).reshape({rows, n, seeds, 1, 1});
  // Every seed accepted (always so for one model): no masks, whose products by 1 and sums with 0
  // leave the same values (and cost ~10 us an attempt).
  bool all_accepted = true;
  for (bool a : accepted) all_accepted = all_accepted && a;
  const Tensor m = all_accepted ? Tensor() : bool_tensor(accepted, gy.device()).to(gy.scalar_type()).view({-1, 1, 1});
  Tensor g_k = at::zeros({n, gy.size(0), gy.size(1), gy.size(2)}, gy.options());
  // g_y1 is written only where the interpolant's adjoint is added; else it may be gy itself.
  Tensor g_y1 = all_accepted ? (interp.empty() ? gy : gy.clone()) : gy * m;
  g_k.select(0, n - 1).copy_(all_accepted ? gf : gf * m);
  Tensor g_y;
  if (!interp.empty()) {
    g_y = interp[0];
    g_y1.add_(interp[1]);
    g_k.select(0, 0).add_(interp[3]);
    g_k.select(0, n - 1).add_(interp[4]);
    g_y.add_(interp[2]);
    g_k.addcmul_(interp[2].unsqueeze(0), wk.select(0, row_mid));
  }
  if (!fsal) {
    g_y = g_y.defined() ? g_y.add_(g_y1) : g_y1.clone();
    g_k.addcmul_(g_y1.unsqueeze(0), wk.select(0, row_b));
  }
  std::vector<Tensor> combos;  // adjoints of the combinations h * row . k, for dL/dh
  std::vector<int64_t> combo_rows;
  bool fresh_y = !g_y.defined();  // g_y is the first stage's g_in (a copy)
  for (int64_t i = n - 1; i > 0; --i) {
    Tensor g_in = field_backward(g_k.select(0, i), zs.select(0, i - 1), h1s.select(0, i - 1), h2s.select(0, i - 1), w, acc);
    const bool add_y1 = fsal && i == n - 1;
    if (!g_y.defined()) g_y = at::empty_like(g_in, at::MemoryFormat::Contiguous);  // g_in's copy below
    if (stage_loop_takes(g_in, g_k, g_y, add_y1 ? &g_y1 : nullptr, wk)) {
      AT_DISPATCH_FLOATING_TYPES(g_in.scalar_type(), "stage_adjoints", [&] {
        stage_adjoints<scalar_t>(g_in, add_y1 ? &g_y1 : nullptr, g_y, fresh_y, g_k, wk, i);
      });
    } else {
      if (add_y1) g_in.add_(g_y1);
      if (fresh_y) {
        g_y.copy_(g_in);
      } else {
        g_y.add_(g_in);
      }
      g_k.slice(0, 0, i).add_(g_in.unsqueeze(0) * wk.select(0, i - 1).slice(0, 0, i));
    }
    fresh_y = false;
    if (first) {
      combos.push_back(g_in);
      combo_rows.push_back(i - 1);
    }
  }
  Tensor g_h;
  if (first) {
    if (!fsal) {
      combos.push_back(g_y1);
      combo_rows.push_back(row_b);
    }
    if (!interp.empty()) {
      combos.push_back(interp[2]);
      combo_rows.push_back(row_mid);
    }
    g_h = at::sum(step_size_terms(combos, combo_rows, ks, rows64), {1, 2});
  } else if (!no_zeros) {
    g_h = at::zeros({gy.size(0)}, gy.options().dtype(at::kDouble));
  }
  if (all_accepted) return {g_y, g_k.select(0, 0), g_h};
  const Tensor keep = at::rsub(m, 1);
  return {g_y.addcmul_(gy, keep), g_k.select(0, 0).addcmul_(gf, keep), g_h};
}

std::vector<Tensor> attempt_backward(const Tensor& gy, const Tensor& gf, const std::vector<bool>& accepted,
                                     const Tensor& weights, const Tensor& zs, const Tensor& h1s, const Tensor& h2s, const Tensor& ks,
                                     const std::vector<Tensor>& w, const std::vector<Tensor>& acc, bool fsal, int64_t row_b,
                                     int64_t row_mid, const std::vector<Tensor>& interp, bool first, const Tensor& rows64) {
  return attempt_backward_of(gy, gf, accepted, weights, zs, h1s, h2s, ks, w, acc, fsal, row_b, row_mid, interp, first, rows64, false);
}

// View of per-seed values (or a 0-dim value) broadcasting against `like`, cast to its dtype:
// tune_node.ode.adaptive._per_seed.
Tensor per_seed(const Tensor& values, const Tensor& like) {
  Tensor v = values.scalar_type() == at::kBool ? values : values.to(like.scalar_type());
  if (v.dim() == 0) return v;
  std::vector<int64_t> shape(like.dim(), 1);
  shape[0] = -1;
  return v.view(shape);
}

Tensor rms(const Tensor& x, bool seeded) {
  Tensor squares = x.abs().pow(2);
  return seeded ? squares.flatten(1).mean(1).sqrt() : squares.mean().sqrt();
}

Tensor bool_tensor(const std::vector<bool>& values, const at::Device& device) {
  std::vector<int64_t> ints(values.begin(), values.end());
  return at::tensor(ints, at::TensorOptions().dtype(at::kLong)).to(at::kBool).to(device);
}

namespace {

// The scalar chain of first_step_forward between its norms (per seed, in the states' dtype: float32 or
// float64) as scalar code: the IEEE operations of its ATen calls on (S,) tensors (~25 calls a solve):
// comparisons and products with the constants converted to the dtype, as ATen converts them, and
// maximum/minimum/clamp propagating NaN as theirs do. The roots (in the norms), the reciprocal and the power
// stay ATen calls: ATen's float sqrt and pow are not the correctly rounded ones.
template <typename scalar_t>
std::vector<scalar_t> first_step_h0(const Tensor& d0_t, const Tensor& d1_t) {
  const scalar_t* d0 = d0_t.data_ptr<scalar_t>();
  const scalar_t* d1 = d1_t.data_ptr<scalar_t>();
  const scalar_t small = static_cast<scalar_t>(1e-5), tiny_step = static_cast<scalar_t>(1e-6), share = static_cast<scalar_t>(0.01);
  std::vector<scalar_t> h0(d0_t.numel());
  for (size_t s = 0; s < h0.size(); ++s) {
    const bool tiny = d0[s] < small || d1[s] < small;
    h0[s] = std::abs(tiny ? tiny_step : (d0[s] * share) / d1[s]);
  }
  return h0;
}

template <typename scalar_t>
scalar_t nan_max(scalar_t a, scalar_t b) { return a != a ? a : (b != b ? b : (a > b ? a : b)); }

template <typename scalar_t>
scalar_t nan_min(scalar_t a, scalar_t b) { return a != a ? a : (b != b ? b : (a < b ? a : b)); }

Tensor values_like(const std::vector<double>& values, const Tensor& like) {
  return at::tensor(values, at::TensorOptions().dtype(at::kDouble)).to(like.scalar_type()).view(like.sizes());
}

}  // namespace

// IController.initial_step with its trial evaluation through the dense field, call for call;
// returns the first step size (float64), the trial evaluation's input and output.
std::vector<Tensor> first_step_forward(const Tensor& y0, const Tensor& f0, const std::vector<Tensor>& w, Tensor h1,
                                       const Tensor& h2_trial, bool stacked, double atol, double rtol, int64_t order,
                                       bool seeded) {
  // The elementwise parts as plain loops where they give the same bits: a contiguous y0 (the
  // ATen results' layout, which the norms' sums and the trial product depend on, is then contiguous).
  const bool loops = plain_loops_take(y0) && y0.is_contiguous() && f0.scalar_type() == y0.scalar_type() && f0.sizes() == y0.sizes() &&
                     (y0.dim() == 3) == seeded;
  auto mean_root = [seeded](const Tensor& squares) { return seeded ? squares.flatten(1).mean(1).sqrt() : squares.mean().sqrt(); };
  auto norm_of_scaled = [&](const Tensor& top, const Tensor* minus) {
    if (!loops) {
      const Tensor scale = at::add(at::mul(y0.abs(), rtol), atol);
      return rms((minus ? top - *minus : top) / scale, seeded);
    }
    Tensor squares = at::empty_like(y0, at::MemoryFormat::Contiguous);
    AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "scaled_squares", [&] { scaled_squares<scalar_t>(y0, top, minus, rtol, atol, squares); });
    return mean_root(squares);
  };
  Tensor d0 = norm_of_scaled(y0, nullptr), d1 = norm_of_scaled(f0, nullptr);
  if (loops && d0.is_contiguous() && d1.is_contiguous() && d0.scalar_type() == y0.scalar_type() && d1.scalar_type() == y0.scalar_type())
    return AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "first_step_scalars", [&] {
      const std::vector<scalar_t> h0_steps = first_step_h0<scalar_t>(d0, d1);
      const int64_t seeds = d0.numel();
      std::vector<double> h0_values(h0_steps.begin(), h0_steps.end());  // exact: the dtype's values
      const Tensor h0 = values_like(h0_values, d0);
      Tensor y1 = at::empty_like(y0, at::MemoryFormat::Contiguous);
      trial_state<scalar_t>(y0, f0, h0, y1);
      Tensor f1 = field_eval(y1, w, h1, h2_trial, stacked);
      const Tensor n2_t = norm_of_scaled(f1, &f0).contiguous();
      const scalar_t* n2 = n2_t.data_ptr<scalar_t>();
      const scalar_t* d1_values = d1.data_ptr<scalar_t>();
      const scalar_t limit = static_cast<scalar_t>(1e-15), one = 1;
      std::vector<bool> flat(seeds);
      std::vector<double> largest(seeds);
      for (int64_t s = 0; s < seeds; ++s) {
        const scalar_t d2 = std::abs(n2[s] / h0_steps[s]);
        flat[s] = d1_values[s] <= limit && d2 <= limit;
        largest[s] = static_cast<double>(flat[s] ? one : nan_max(d1_values[s], d2));
      }
      // Python's 0.01 / t is t.reciprocal() * 0.01.
      const Tensor power_t = at::pow(at::mul(values_like(largest, d0).reciprocal(), 0.01), 1.0 / static_cast<double>(order)).contiguous();
      const scalar_t* power = power_t.data_ptr<scalar_t>();
      const scalar_t shrink = static_cast<scalar_t>(1e-3), floor = static_cast<scalar_t>(1e-6), grow = static_cast<scalar_t>(100);
      std::vector<double> h(seeds);
      for (int64_t s = 0; s < seeds; ++s) {
        const scalar_t h1_step = std::abs(flat[s] ? nan_max(h0_steps[s] * shrink, floor) : power[s]);  // clamp(min=floor)
        h[s] = static_cast<double>(nan_min(h0_steps[s] * grow, h1_step));
      }
      return std::vector<Tensor>{at::tensor(h, at::TensorOptions().dtype(at::kDouble)).to(y0.device()), y1, f1};
    });
  Tensor tiny = at::bitwise_or(at::lt(d0, 1e-5), at::lt(d1, 1e-5));
  Tensor h0 = at::where(tiny, at::full_like(d0, 1e-6), at::mul(d0, 0.01) / at::where(tiny, at::ones_like(d1), d1)).abs();
  Tensor y1;
  if (loops) {
    y1 = at::empty_like(y0, at::MemoryFormat::Contiguous);
    AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "trial_state", [&] { trial_state<scalar_t>(y0, f0, h0, y1); });
  } else {
    y1 = y0 + per_seed(h0, y0) * f0;
  }
  Tensor f1 = field_eval(y1, w, h1, h2_trial, stacked);
  Tensor d2 = (norm_of_scaled(f1, &f0) / h0).abs();
  Tensor flat = at::bitwise_and(at::le(d1, 1e-15), at::le(d2, 1e-15));
  Tensor largest = at::where(flat, at::ones_like(d1), at::maximum(d1, d2));
  // Python's 0.01 / t is t.reciprocal() * 0.01.
  Tensor power = at::pow(at::mul(largest.reciprocal(), 0.01), 1.0 / static_cast<double>(order));
  Tensor h1_step = at::where(flat, at::clamp(at::mul(h0, 1e-3), 1e-6), power).abs();
  Tensor h = at::minimum(at::mul(h0, 100), h1_step).to(at::promote_types(at::kDouble, y0.scalar_type()));
  return {h.reshape({-1}), y1, f1};
}

// tune_node.ode.adaptive._interpolate_at for start times that carry no gradient, call for call,
// with the step's midpoint computed as the eager solve computes it; returns the interpolant and the midpoint.
std::vector<Tensor> interpolate_at(double T, const Tensor& y0, const Tensor& y1, const Tensor& ks, const Tensor& weights,
                                   int64_t row_mid, const Tensor& h_t, const std::vector<double>& starts,
                                   const std::vector<bool>& finishing, bool seeded) {
  Tensor y_mid = at::empty(y0.sizes(), y0.options());
  if (!weighted_sum(&y0, ks, weights, row_mid, ks.size(-1), y0.dim() == 3, y_mid))
    y_mid = at::add(y0, at::sum(ks * weights.select(-2, row_mid), {-1}));
  const Tensor f0 = ks.select(-1, 0), f1 = ks.select(-1, ks.size(-1) - 1);
  if (plain_loops_take(y0) && h_t.scalar_type() == at::kDouble && h_t.device().is_cpu() && y1.scalar_type() == y0.scalar_type() &&
      ks.scalar_type() == y0.scalar_type() && y1.sizes() == y0.sizes() && (y0.dim() == 3) == seeded) {
    // The calls below with the per-seed scalars in double precision (the same operations on the same values).
    const Tensor h_values = h_t.contiguous();
    const double* h = h_values.data_ptr<double>();
    const int64_t seeds = static_cast<int64_t>(starts.size());
    std::vector<double> x(seeds), dt(seeds);
    for (int64_t s = 0; s < seeds; ++s) {
      const double step = finishing[s] ? h[s] : 1.0;
      x[s] = (T - starts[s]) / ((starts[s] + step) - starts[s]);
      dt[s] = h[s];
    }
    Tensor total = at::empty_like(y_mid, at::MemoryFormat::Contiguous);
    AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "interpolate_at",
                               [&] { interpolant_loop<scalar_t>(y0, y1, y_mid, f0, f1, x, dt, total); });
    return {total, y_mid};
  }
  Tensor start = at::tensor(starts, at::TensorOptions().dtype(at::kDouble)).to(y0.device());
  bool all_finishing = true;
  for (bool f : finishing) all_finishing = all_finishing && f;
  Tensor step = all_finishing ? h_t : at::where(bool_tensor(finishing, y0.device()), h_t, at::ones_like(h_t));
  Tensor end = start + step;
  Tensor x = at::rsub(start, T) / (end - start);
  Tensor h = h_t;
  if (!seeded) {
    x = x.reshape(std::vector<int64_t>{});
    h = h.reshape(std::vector<int64_t>{});
  }
  x = per_seed(x, y0);
  Tensor dt = per_seed(h, y0);
  Tensor a = at::mul(dt, 2) * (f1 - f0) - at::mul(y1 + y0, 8) + at::mul(y_mid, 16);
  Tensor b = dt * (at::mul(f0, 5) - at::mul(f1, 3)) + at::mul(y0, 18) + at::mul(y1, 14) - at::mul(y_mid, 32);
  Tensor c = dt * (f1 - at::mul(f0, 4)) - at::mul(y0, 11) - at::mul(y1, 5) + at::mul(y_mid, 16);
  Tensor d = dt * f0;
  Tensor total = y0 + x * d;
  Tensor power = x;
  for (const Tensor* coefficient : {&c, &b, &a}) {
    power = power * x;
    total = total + power * *coefficient;
  }
  return {total, y_mid};
}

namespace {

// torch.minimum's gradient to its first input: all of it where smaller, half on a tie.
double min_share(double g, double a, double b) { return a < b ? g : (a == b ? 0.5 * g : 0.0); }

double sign(double x) { return static_cast<double>((x > 0) - (x < 0)); }

Tensor per_seed_factors(const std::vector<double>& values, int64_t rows, const Tensor& like) {
  return at::tensor(values, at::TensorOptions().dtype(at::kDouble)).to(like.scalar_type()).to(like.device()).view({rows, -1, 1, 1});
}

// interpolant_backward's elementwise products as one loop: grads[p] = g * factor[p] (p < 5) and products[p] =
// v_p * (g * factor[5]) for v = y0, y1, midpoint, f0, f1, the factors per seed converted to the dtype as
// per_seed_factors converts them: the IEEE operations of its ATen calls (the stack only copies).
template <typename scalar_t>
NO_FP_CONTRACT void interpolant_products(const Tensor& g_t, const std::vector<const Tensor*>& states, const std::vector<double>& factors,
                                         Tensor& grads_t, Tensor& products_t) {
  NO_FP_CONTRACT_BODY
  const int64_t seeds = g_t.size(0), rows = g_t.size(1), columns = g_t.size(2), per_part = seeds * rows * columns;
  const scalar_t* g = g_t.data_ptr<scalar_t>();
  scalar_t* grads = grads_t.data_ptr<scalar_t>();
  scalar_t* products = products_t.data_ptr<scalar_t>();
  std::vector<Strided<scalar_t>> v;
  for (const Tensor* t : states) v.emplace_back(*t);
  for (int64_t s = 0; s < seeds; ++s) {
    scalar_t f[6];
    for (int p = 0; p < 6; ++p) f[p] = static_cast<scalar_t>(factors[p * seeds + s]);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < columns; ++j) {
        const int64_t e = (s * rows + i) * columns + j;
        const scalar_t gv = g[e], G = gv * f[5];
        for (int p = 0; p < 5; ++p) {
          grads[p * per_part + e] = gv * f[p];
          products[p * per_part + e] = v[p](s, i, j) * G;
        }
      }
  }
}

}  // namespace

// Gradients of the interpolant at T for the seeds an attempt finishes (all (S, B, W)): of
// its start state, solution, midpoint, first and last stage outputs, and of the first step
// size (float64; through the step size on the first attempt, and through the start time where
// that carries the first step size). The interpolant is linear in the states; its weights,
// polynomials in where T falls, are taken per seed in double precision.
std::vector<Tensor> interpolant_backward(double T, const Tensor& grad_out, const Tensor& y0_in, const Tensor& y1_in,
                                         const Tensor& ym_in, const Tensor& ks_in, const Tensor& h_t,
                                         const std::vector<double>& starts, const std::vector<bool>& finishing,
                                         const std::vector<bool>& offset, bool first) {
  const int64_t seeds = grad_out.size(0);
  const bool single = y0_in.dim() == 2;  // one model's states: seeds as a leading 1
  const Tensor y0 = single ? y0_in.unsqueeze(0) : y0_in, y1 = single ? y1_in.unsqueeze(0) : y1_in;
  const Tensor ym = single ? ym_in.unsqueeze(0) : ym_in, ks = single ? ks_in.unsqueeze(0) : ks_in;
  const Tensor f0 = ks.select(-1, 0), f1 = ks.select(-1, ks.size(-1) - 1);
  const std::vector<double> h = to_doubles(h_t);
  std::vector<double> x(seeds), dt(seeds), span(seeds), weights(6 * seeds, 0.0);
  for (int64_t s = 0; s < seeds; ++s) {
    if (!finishing[s]) continue;  // its weights stay 0: the interpolant is not its output
    span[s] = (starts[s] + h[s]) - starts[s];
    x[s] = (T - starts[s]) / span[s];
    dt[s] = h[s];
    const double x1 = x[s], x2 = x1 * x1, x3 = x2 * x1, x4 = x2 * x2, d = dt[s];
    weights[0 * seeds + s] = 1 - 11 * x2 + 18 * x3 - 8 * x4;       // y0
    weights[1 * seeds + s] = -5 * x2 + 14 * x3 - 8 * x4;           // y1
    weights[2 * seeds + s] = 16 * x2 - 32 * x3 + 16 * x4;          // midpoint
    weights[3 * seeds + s] = d * (x1 - 4 * x2 + 5 * x3 - 2 * x4);  // f0
    weights[4 * seeds + s] = d * (x2 - 3 * x3 + 2 * x4);           // f1
    weights[5 * seeds + s] = 1;                                    // the output's gradient reaches it
  }
  // Per seed, G . v for v = y0, y1, midpoint, f0, f1: dL/dx and dL/ddt are combinations of these.
  Tensor grads, products;
  bool loops = plain_loops_take(grad_out) && grad_out.dim() == 3 && grad_out.is_contiguous();
  for (const Tensor* t : {&y0, &y1, &ym, &f0, &f1})
    loops = loops && t->scalar_type() == grad_out.scalar_type() && t->device() == grad_out.device() && t->sizes() == grad_out.sizes();
  if (loops) {
    grads = at::empty({5, seeds, grad_out.size(1), grad_out.size(2)}, grad_out.options());
    products = at::empty_like(grads);
    AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "interpolant_products", [&] {
      interpolant_products<scalar_t>(grad_out, {&y0, &y1, &ym, &f0, &f1}, weights, grads, products);
    });
  } else {
    Tensor factors = per_seed_factors(weights, 6, grad_out);
    grads = grad_out.unsqueeze(0) * factors.slice(0, 0, 5);
    products = at::stack({y0, y1, ym, f0, f1}) * (grad_out * factors.select(0, 5));
  }
  const std::vector<double> dots = to_doubles(at::sum(products, {2, 3}));
  std::vector<double> g_h(seeds, 0.0);
  for (int64_t s = 0; s < seeds; ++s) {
    if (!finishing[s]) continue;
    const double x1 = x[s], x2 = x1 * x1, x3 = x2 * x1, x4 = x2 * x2, d = dt[s];
    const double Gy0 = dots[s], Gy1 = dots[seeds + s], Gym = dots[2 * seeds + s], Gf0 = dots[3 * seeds + s], Gf1 = dots[4 * seeds + s];
    // d/dx of y0 + x d + x^2 c + x^3 b + x^4 a, with a, b, c, d the interpolant's coefficients.
    const double g_x = Gy0 * (-22 * x1 + 54 * x2 - 32 * x3) + Gy1 * (-10 * x1 + 42 * x2 - 32 * x3) +
                       Gym * (32 * x1 - 96 * x2 + 64 * x3) + Gf0 * d * (1 - 8 * x1 + 15 * x2 - 8 * x3) +
                       Gf1 * d * (2 * x1 - 9 * x2 + 8 * x3);
    if (offset[s]) g_h[s] -= g_x / span[s];
    if (first) {
      const double g_dt = Gf0 * (x1 - 4 * x2 + 5 * x3 - 2 * x4) + Gf1 * (x2 - 3 * x3 + 2 * x4);
      g_h[s] += g_dt - g_x * (T - starts[s]) / (span[s] * span[s]);
    }
  }
  Tensor g_h_t = at::tensor(g_h, at::TensorOptions().dtype(at::kDouble)).to(grad_out.device());
  return {grads[0], grads[1], grads[2], grads[3], grads[4], g_h_t};
}

namespace {

// first_step_backward's elementwise chains as loops over (S, B, W), all contiguous: the IEEE
// operations of its ATen calls (scalars converted to the dtype first, no fused multiply-add), in
// the same order. The scale's inverse inv = 1 / (|z0| rtol + atol) and u = (z0, f0, f1 - f0) inv.
template <typename scalar_t>
VECTORIZED void first_step_scaled(const Tensor& z0_t, const Tensor& f0_t, const Tensor& f1_t, double rtol, double atol, Tensor& inv_t,
                                  Tensor& u_t) {
  NO_FP_CONTRACT_BODY
  const int64_t numel = z0_t.numel();
  const scalar_t* __restrict__ z0 = z0_t.data_ptr<scalar_t>();
  const scalar_t* __restrict__ f0 = f0_t.data_ptr<scalar_t>();
  const scalar_t* __restrict__ f1 = f1_t.data_ptr<scalar_t>();
  scalar_t* __restrict__ inv = inv_t.data_ptr<scalar_t>();
  scalar_t* __restrict__ u0 = u_t.data_ptr<scalar_t>();
  scalar_t* __restrict__ u1 = u0 + numel;
  scalar_t* __restrict__ u2 = u1 + numel;
  const scalar_t r = static_cast<scalar_t>(rtol), t = static_cast<scalar_t>(atol), one = 1;
  for (int64_t e = 0; e < numel; ++e) {
    const scalar_t i = one / (std::abs(z0[e]) * r + t);
    inv[e] = i;
    u0[e] = z0[e] * i;
    u1[e] = f0[e] * i;
    u2[e] = (f1[e] - f0[e]) * i;
  }
}

// g_f1 = u2 * factor2 (per seed) * inv.
template <typename scalar_t>
VECTORIZED void first_step_trial_gradient(const Tensor& u_t, const Tensor& inv_t, const std::vector<double>& factors, Tensor& g_t) {
  NO_FP_CONTRACT_BODY
  const int64_t seeds = inv_t.size(0), per_seed = inv_t.numel() / seeds;
  const scalar_t* __restrict__ u2 = u_t.data_ptr<scalar_t>() + 2 * inv_t.numel();
  const scalar_t* __restrict__ inv = inv_t.data_ptr<scalar_t>();
  scalar_t* __restrict__ g = g_t.data_ptr<scalar_t>();
  for (int64_t s = 0; s < seeds; ++s) {
    const scalar_t factor = static_cast<scalar_t>(factors[2 * seeds + s]);
    for (int64_t e = s * per_seed; e < (s + 1) * per_seed; ++e) g[e] = u2[e] * factor * inv[e];
  }
}

// g_u = u f (per part and seed), g_scale = -(g_u0 u0 + g_u1 u1 + g_u2 u2) inv, then
// g_z0 = g_z0_steps + g_trial + g_u0 inv + (g_scale sign(z0)) rtol and
// g_f0 = g_f0_steps - g_f1 + g_trial f3 + g_u1 inv (left to right), into g_z0 and g_f0.
template <typename scalar_t>
VECTORIZED void first_step_tail(const Tensor& z0_t, const Tensor& u_t, const Tensor& inv_t, const std::vector<double>& factors,
                                const Tensor& g_z0_steps_t, const Tensor& g_f0_steps_t, const Tensor& g_trial_t, const Tensor& g_f1_t,
                                double rtol, Tensor& g_z0_t, Tensor& g_f0_t) {
  NO_FP_CONTRACT_BODY
  const int64_t seeds = inv_t.size(0), numel = inv_t.numel(), per_seed = numel / seeds;
  const scalar_t* __restrict__ z0 = z0_t.data_ptr<scalar_t>();
  const scalar_t* __restrict__ u0 = u_t.data_ptr<scalar_t>();
  const scalar_t* __restrict__ u1 = u0 + numel;
  const scalar_t* __restrict__ u2 = u1 + numel;
  const scalar_t* __restrict__ inv = inv_t.data_ptr<scalar_t>();
  const scalar_t* __restrict__ gz_steps = g_z0_steps_t.data_ptr<scalar_t>();
  const scalar_t* __restrict__ gf_steps = g_f0_steps_t.data_ptr<scalar_t>();
  const scalar_t* __restrict__ g_trial = g_trial_t.data_ptr<scalar_t>();
  const scalar_t* __restrict__ g_f1 = g_f1_t.data_ptr<scalar_t>();
  scalar_t* __restrict__ g_z0 = g_z0_t.data_ptr<scalar_t>();
  scalar_t* __restrict__ g_f0 = g_f0_t.data_ptr<scalar_t>();
  const scalar_t r = static_cast<scalar_t>(rtol), zero = 0;
  for (int64_t s = 0; s < seeds; ++s) {
    const scalar_t f0 = static_cast<scalar_t>(factors[s]), f1 = static_cast<scalar_t>(factors[seeds + s]);
    const scalar_t f2 = static_cast<scalar_t>(factors[2 * seeds + s]), f3 = static_cast<scalar_t>(factors[3 * seeds + s]);
    for (int64_t e = s * per_seed; e < (s + 1) * per_seed; ++e) {
      const scalar_t gu0 = u0[e] * f0, gu1 = u1[e] * f1, gu2 = u2[e] * f2;
      const scalar_t g_scale = -((gu0 * u0[e] + gu1 * u1[e]) + gu2 * u2[e]) * inv[e];
      const scalar_t sign_z0 = static_cast<scalar_t>((zero < z0[e]) - (z0[e] < zero));
      g_z0[e] = ((gz_steps[e] + g_trial[e]) + gu0 * inv[e]) + (g_scale * sign_z0) * r;
      g_f0[e] = ((gf_steps[e] - g_f1[e]) + g_trial[e] * f3) + gu1 * inv[e];
    }
  }
}

}  // namespace

// The first step size's rule (IController.initial_step) and the first evaluation f0 = f(z0)
// added to dL/dz0, given dL/dh (float64, per seed) and dL/df0 from the steps; (S, B, W)
// tensors. The rule's scalar chain (norms to step size) is differentiated per seed in
// double precision; only its ends touch the states.
Tensor first_step_backward(const Tensor& g_h, const Tensor& g_z0_steps, const Tensor& g_f0_steps, const Tensor& z0,
                           const Tensor& f0, const Tensor& trial_z, const Tensor& trial_h1, const Tensor& trial_h2,
                           const Tensor& f1, const Tensor& h1_first, const Tensor& h2_first, const std::vector<Tensor>& w,
                           const std::vector<Tensor>& acc,
                           double atol, double rtol, int64_t order) {
  const int64_t seeds = z0.size(0);
  const double count = static_cast<double>(z0.size(1) * z0.size(2));
  const double p = 1.0 / static_cast<double>(order);
  bool loops = plain_loops_take(z0) && z0.dim() == 3;
  for (const Tensor* t : std::initializer_list<const Tensor*>{&z0, &f0, &f1, &g_z0_steps, &g_f0_steps})
    loops = loops && t->is_contiguous() && t->scalar_type() == z0.scalar_type() && t->device() == z0.device() && t->sizes() == z0.sizes();
  Tensor inv, u;  // the scale's inverse; the scaled state, field, field difference
  if (loops) {
    inv = at::empty_like(z0);
    u = at::empty({3, z0.size(0), z0.size(1), z0.size(2)}, z0.options());
    AT_DISPATCH_FLOATING_TYPES(z0.scalar_type(), "first_step_scaled", [&] { first_step_scaled<scalar_t>(z0, f0, f1, rtol, atol, inv, u); });
  } else {
    inv = at::add(at::mul(z0.abs(), rtol), atol).reciprocal();
    u = at::stack({z0, f0, f1 - f0}) * inv;
  }
  const std::vector<double> norms = to_doubles(u.square().mean({2, 3}).sqrt());
  const std::vector<double> gh = to_doubles(g_h);
  std::vector<double> h0(seeds), h0_sign(seeds), g_h0(seeds), g_d1(seeds), factors(4 * seeds, 0.0);
  std::vector<bool> tiny(seeds);
  for (int64_t s = 0; s < seeds; ++s) {
    const double d0 = norms[s], d1 = norms[seeds + s], n2 = norms[2 * seeds + s];
    tiny[s] = d0 < 1e-5 || d1 < 1e-5;
    const double h0_raw = tiny[s] ? 1e-6 : 0.01 * d0 / d1;
    h0[s] = std::abs(h0_raw);
    h0_sign[s] = sign(h0_raw);
    const double d2_raw = n2 / h0[s], d2 = std::abs(d2_raw);
    const bool flat = d1 <= 1e-15 && d2 <= 1e-15;
    const double largest = flat ? 1.0 : std::max(d1, d2);
    const double h1_raw = flat ? std::max(h0[s] * 1e-3, 1e-6) : std::pow(0.01 / largest, p);
    const double h1 = std::abs(h1_raw);
    double g0 = 100 * min_share(gh[s], 100 * h0[s], h1);
    const double g1_raw = min_share(gh[s], h1, 100 * h0[s]) * sign(h1_raw);
    if (flat && h0[s] * 1e-3 >= 1e-6) g0 += 1e-3 * g1_raw;
    const double g_largest = flat ? 0.0 : g1_raw * p * std::pow(0.01 / largest, p - 1) * (-0.01 / (largest * largest));
    g_d1[s] = min_share(g_largest, -d1, -d2);  // maximum: to the larger, halved on ties
    const double g_d2_raw = min_share(g_largest, -d2, -d1) * sign(d2_raw);
    g0 -= g_d2_raw * n2 / (h0[s] * h0[s]);
    g_h0[s] = g0;
    factors[2 * seeds + s] = g_d2_raw / h0[s] / (count * n2);  // dL/du2 = factor * u2
    factors[3 * seeds + s] = h0[s];
  }
  Tensor g_f1;
  if (loops) {
    g_f1 = at::empty_like(z0);
    AT_DISPATCH_FLOATING_TYPES(z0.scalar_type(), "first_step_trial_gradient",
                               [&] { first_step_trial_gradient<scalar_t>(u, inv, factors, g_f1); });
  } else {
    g_f1 = u.select(0, 2) * per_seed_factors(factors, 4, z0).select(0, 2) * inv;
  }
  Tensor g_trial = field_backward(g_f1, trial_z, trial_h1, trial_h2, w, acc);  // the trial input z0 + h0 f0
  const std::vector<double> dots = to_doubles(at::sum(g_trial * f0, {1, 2}));
  for (int64_t s = 0; s < seeds; ++s) {
    const double d0 = norms[s], d1 = norms[seeds + s];
    const double g_h0_raw = (g_h0[s] + dots[s]) * h0_sign[s];
    const double g_d0 = tiny[s] ? 0.0 : 0.01 * g_h0_raw / d1;
    const double g_d1_total = g_d1[s] - (tiny[s] ? 0.0 : 0.01 * d0 * g_h0_raw / (d1 * d1));
    factors[s] = g_d0 / (count * d0);
    factors[seeds + s] = g_d1_total / (count * d1);
  }
  Tensor g_z0, g_f0;
  if (loops && g_trial.is_contiguous() && g_trial.sizes() == z0.sizes()) {
    g_z0 = at::empty_like(z0);
    g_f0 = at::empty_like(z0);
    AT_DISPATCH_FLOATING_TYPES(z0.scalar_type(), "first_step_tail", [&] {
      first_step_tail<scalar_t>(z0, u, inv, factors, g_z0_steps, g_f0_steps, g_trial, g_f1, rtol, g_z0, g_f0);
    });
  } else {
    Tensor f = per_seed_factors(factors, 4, z0);
    Tensor g_u = u * f.slice(0, 0, 3);  // dL/du per part
    Tensor g_scale = -(g_u.select(0, 0) * u.select(0, 0) + g_u.select(0, 1) * u.select(0, 1) + g_u.select(0, 2) * u.select(0, 2)) * inv;
    g_z0 = g_z0_steps + g_trial + g_u.select(0, 0) * inv + at::mul(g_scale * at::sign(z0), rtol);
    g_f0 = g_f0_steps - g_f1 + g_trial * f.select(0, 3) + g_u.select(0, 1) * inv;
  }
  return g_z0 + field_backward(g_f0, z0, h1_first, h2_first, w, acc);
}

namespace {

bool all_of(const std::vector<bool>& v) {
  for (bool b : v)
    if (!b) return false;
  return true;
}

bool any_of(const std::vector<bool>& v) {
  for (bool b : v)
    if (b) return true;
  return false;
}

// IController's constants; decide() is IController.decide in the same IEEE operations, so the same
// accept/reject decisions and next step sizes bit for bit (std::min/std::max pick the same
// operand as Python's min/max, and Python's float ** is C's pow).
struct Control {
  double atol, rtol, safety, ifactor, dfactor;
  int64_t order;

  std::pair<bool, double> decide(double h, double ratio) const {
    if (!(ratio == ratio)) return {false, std::numeric_limits<double>::quiet_NaN()};
    const bool accept = ratio <= 1;
    if (ratio == 0) return {accept, h * ifactor};
    const double shrink = ratio < 1 ? 1.0 : dfactor;
    return {accept, h * std::min(ifactor, std::max(safety / std::pow(ratio, 1.0 / static_cast<double>(order)), shrink))};
  }
};

// What the backward pass needs of one kept attempt (tune_node.fast.adaptive_solve._Attempt).
struct Kept {
  Tensor y, weights, h_t, y1, y_mid;
  std::vector<Tensor> slot;  // zs, h2s, ks, y1 buffer, h1s, for the attempt's seeds
  std::vector<int64_t> seeds;  // the attempt's seeds (all of them, or the running ones of a compacted group)
  std::vector<Tensor> w;  // a compacted group's weights for its seeds (the forward pass's gathers), else empty
  std::vector<bool> accepted, finishing, offset;
  std::vector<double> starts;
  bool first = false, finishes = false;
};

// The whole solve's calls skip autograd's dispatch layers (its kernel in front of every ATen call, views'
// tracking and version counters): they run without gradients anyway (inside an autograd node's forward or
// backward pass, on buffers of their own), so only per-call bookkeeping goes; the kernels, hence the results,
// are the same. A 5-seed Fehlberg21 solve at tol 1e-3 makes ~1500 calls; this saved ~0.3 ms of its ~4.5.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

Tensor index_tensor(const std::vector<int64_t>& values, const at::Device& device) {
  return at::tensor(values, at::TensorOptions().dtype(at::kLong)).to(device);
}

}  // namespace

// One whole fused solve, stepped here rather than attempt by attempt from Python: the Python
// between the per-attempt loops (step control, bookkeeping, tensors of step sizes and masks) cost
// 0.1-0.2 ms per solve, 4-10% of a one-seed solve of 8-20 evaluations. Per seed it makes the calls
// of tune_node.fast.adaptive_solve._forward (with these loops) in the same order on the same
// values, so the same bits; failure says which of its errors Python is to raise.
//
// A group is compacted to its running seeds once one finishes: the seeds take 8 to 46
// evaluations at the same tolerance, and computing finished ones (masked, with step size 0) until
// the slowest ends cost up to half of a group's evaluations. Every per-seed operation here (batched
// products, elementwise ops, per-seed norms) gives a seed the same bits whichever seeds share its
// batch, which is why a group already equals separate solves; the backward pass gathers a
// compacted stretch's adjoints and weight-gradient accumulators and scatters them back, so each
// seed's gradient terms are added in the order of its own solve.
struct Solve {
  Tensor out, z0, f0, h1_first, h2_first, trial_z, trial_h1, trial_h2, trial_k;
  std::vector<Kept> kept;
  std::vector<std::vector<Tensor>> slots;  // every buffer set it held, for the pool
  std::vector<int64_t> nfe, attempts;
  std::vector<std::vector<double>> accepted;
  int64_t failure = 0;  // 0: none, 1: step limit, 2: step size underflow
  int64_t failed_seed = -1;
  double failed_t = 0.0, failed_h = 0.0;

  Tensor backward(const Tensor& grad_out_in, const std::vector<Tensor>& w, const std::vector<Tensor>& acc,
                  const Tensor& rows64, double T, bool fsal, int64_t row_b, int64_t row_mid, double atol, double rtol,
                  int64_t order);
  std::vector<Tensor> gradients(const Tensor& grad_out, const std::vector<Tensor>& dense, const Tensor& rows64, double T, bool fsal,
                                int64_t row_b, int64_t row_mid, double atol, double rtol, int64_t order,
                                const std::optional<Tensor>& index, const std::vector<std::vector<int64_t>>& conv_shapes);
};

std::shared_ptr<Solve> solve_forward(const Tensor& z0, const std::vector<Tensor>& w_all, const Tensor& coefficients, bool stacked,
                                     bool fsal, int64_t row_b, int64_t row_err, int64_t row_mid, int64_t hidden, double T,
                                     double atol, double rtol, int64_t order, double safety, double ifactor, double dfactor,
                                     bool seeded, int64_t max_steps, bool record, std::vector<std::vector<Tensor>> free_slots) {
  const BelowAutograd below_autograd;
  auto run = std::make_shared<Solve>();
  const Control control{atol, rtol, safety, ifactor, dfactor, order};
  const int64_t n = coefficients.size(-1);
  const int64_t seeds = stacked ? z0.size(0) : 1;
  const int64_t width = z0.size(-1);
  const at::Device device = z0.device();
  const std::vector<int64_t> lead(z0.sizes().begin(), z0.sizes().end() - 1);
  auto shaped = [&](std::optional<int64_t> before, int64_t last, std::optional<int64_t> after) {
    std::vector<int64_t> shape;
    if (before) shape.push_back(*before);
    shape.insert(shape.end(), lead.begin(), lead.end());
    shape.push_back(last);
    if (after) shape.push_back(*after);
    return at::empty(shape, z0.options());
  };
  // Buffers for the running seeds: a whole group's set, or its first `count` seeds' part when
  // compacted (contiguous views, laid out as buffers of that many seeds would be).
  auto narrowed = [seeds](const std::vector<Tensor>& full, int64_t count) {
    if (count == seeds) return full;
    return std::vector<Tensor>{full[0].narrow(1, 0, count), full[1].narrow(1, 0, count), full[2].narrow(0, 0, count),
                               full[3].narrow(0, 0, count), full[4].narrow(1, 0, count)};
  };
  auto take_slot = [&]() {
    std::vector<Tensor> slot;
    if (!free_slots.empty()) {
      slot = free_slots.back();
      free_slots.pop_back();
    } else {
      slot = {shaped(n - 1, width, std::nullopt), shaped(n - 1, hidden, std::nullopt), shaped(std::nullopt, width, n),
              shaped(std::nullopt, width, std::nullopt), shaped(n - 1, hidden, std::nullopt)};
    }
    run->slots.push_back(slot);
    return slot;
  };

  run->z0 = z0;
  run->h1_first = shaped(std::nullopt, hidden, std::nullopt);
  run->h2_first = shaped(std::nullopt, hidden, std::nullopt);
  run->trial_h1 = shaped(std::nullopt, hidden, std::nullopt);
  run->trial_h2 = shaped(std::nullopt, hidden, std::nullopt);
  Tensor f0 = field_eval(z0, w_all, run->h1_first, run->h2_first, stacked);
  run->f0 = f0;
  const std::vector<Tensor> trial = first_step_forward(z0, f0, w_all, run->trial_h1, run->trial_h2, stacked, atol, rtol, order, seeded);
  const Tensor h_first = trial[0];
  run->trial_z = trial[1];
  run->trial_k = trial[2];

  std::vector<double> steps_h = to_doubles(h_first), times(seeds, 0.0), starts(seeds, 0.0);
  run->nfe.assign(seeds, 2);
  run->attempts.assign(seeds, 0);
  run->accepted.assign(seeds, {});
  std::vector<bool> timed_by_first(seeds, false), done(seeds, false);
  // The running seeds; per-seed bookkeeping above stays indexed by seed, tensors by position here.
  std::vector<int64_t> running(seeds);
  for (int64_t s = 0; s < seeds; ++s) running[s] = s;
  std::vector<Tensor> w = w_all;
  Tensor y = z0, out;
  bool first = true;
  std::vector<Tensor> slot;
  auto fail = [&](int64_t code, int64_t s) {
    run->failure = code;
    run->failed_seed = s;
    run->failed_t = times[s];
    run->failed_h = steps_h[s];
    for (auto& spare : free_slots) run->slots.push_back(spare);
    return run;
  };
  while (!running.empty()) {
    const int64_t count = static_cast<int64_t>(running.size());
    for (int64_t s : running) {
      if (max_steps >= 0 && run->attempts[s] >= max_steps) return fail(1, s);
      if (!(std::isfinite(steps_h[s]) && times[s] + steps_h[s] > times[s])) return fail(2, s);
    }
    Tensor h_t = h_first;
    if (!first) {
      std::vector<double> h(count);
      for (int64_t j = 0; j < count; ++j) h[j] = steps_h[running[j]];
      h_t = at::tensor(h, at::TensorOptions().dtype(at::kDouble)).to(device);
    }
    if (slot.empty()) slot = narrowed(take_slot(), count);
    const std::vector<Tensor> step = attempt_stages(y, f0, h_t, coefficients, w, slot[0], slot[4], slot[1], slot[2], slot[3], stacked,
                                                    fsal, row_b, row_err, atol, rtol, seeded);
    const Tensor& y1 = step[0];
    const Tensor& weights = step[2];
    const std::vector<double> ratios = error_ratios(step[1]);
    std::vector<bool> accept(count, true), finishing(count, false), offset(count);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t s = running[j];
      offset[j] = timed_by_first[s];
      run->attempts[s] += 1;
      run->nfe[s] += n - 1;
      const auto [ok, h_next] = control.decide(steps_h[s], ratios[j]);
      accept[j] = ok;
      if (ok) {
        timed_by_first[s] = timed_by_first[s] || first;
        starts[s] = times[s];
        times[s] = times[s] + steps_h[s];
        run->accepted[s].push_back(times[s]);
        finishing[j] = times[s] >= T;
      }
      steps_h[s] = h_next;
    }
    const bool any_accepted = any_of(accept);
    Kept* kept = nullptr;
    if (any_accepted && record) {
      run->kept.push_back(Kept{y, weights, h_t, Tensor(), Tensor(), slot, running, count < seeds ? w : std::vector<Tensor>(), accept, {},
                               {}, {}, first, false});
      kept = &run->kept.back();
    }
    std::vector<int64_t> still;  // positions of the seeds still running after this attempt
    if (any_of(finishing)) {
      std::vector<double> step_starts(count);
      std::vector<int64_t> ended;
      for (int64_t j = 0; j < count; ++j) {
        step_starts[j] = finishing[j] ? starts[running[j]] : T;
        if (finishing[j]) {
          done[running[j]] = true;
          ended.push_back(j);
        } else {
          still.push_back(j);
        }
      }
      const std::vector<Tensor> fit = interpolate_at(T, y, y1, slot[2], weights, row_mid, h_t, step_starts, finishing, stacked);
      if (!out.defined()) {
        out = fit[0];  // the first seeds to finish: the whole group runs still
      } else {
        std::vector<int64_t> rows;
        for (int64_t j : ended) rows.push_back(running[j]);
        out.index_copy_(0, index_tensor(rows, device), fit[0].index_select(0, index_tensor(ended, device)));
      }
      if (kept) {
        kept->finishing = finishing;
        kept->starts = step_starts;
        kept->offset = offset;
        kept->y1 = y1;
        kept->y_mid = fit[1];
        kept->finishes = true;
      }
      if (still.empty()) break;
    }
    const Tensor f_last = slot[2].select(-1, n - 1);
    if (all_of(accept)) {
      y = y1;
      f0 = f_last;
    } else if (any_accepted) {
      const Tensor mask = bool_tensor(accept, device).view({-1, 1, 1});
      y = at::where(mask, y1, y);
      f0 = at::where(mask, f_last, f0);
    }
    if (!still.empty()) {
      // Seeds finished: the next attempts run the others only (copies: the state leaves the buffers).
      const Tensor index = index_tensor(still, device);
      y = y.index_select(0, index);
      f0 = f0.index_select(0, index);
      for (auto& t : w) t = t.index_select(0, index);
      std::vector<int64_t> next;
      for (int64_t j : still) next.push_back(running[j]);
      running = next;
      // A kept attempt keeps its buffers; an unkept one's serve the next attempt, now narrower.
      slot = kept ? std::vector<Tensor>() : narrowed(run->slots.back(), static_cast<int64_t>(running.size()));
    } else if (kept) {
      slot.clear();  // the attempt keeps its buffers; the next one takes fresh ones
    } else if (any_accepted) {
      // The next attempt reuses this one's buffers: the state must not live in them.
      y = y.clone();
      f0 = f0.clone();
    }
    first = false;
  }
  for (auto& spare : free_slots) run->slots.push_back(spare);
  run->out = out;
  return run;
}

// dL/dz0 given dL/dz(T) (S, B, W), accumulating the weight gradients into acc: per seed the calls
// of tune_node.fast.adaptive_solve._backward in the same order. A compacted stretch of attempts
// works on its seeds' rows of the adjoints and accumulators (gathered, then scattered back).
Tensor Solve::backward(const Tensor& grad_out_in, const std::vector<Tensor>& w_all, const std::vector<Tensor>& acc_all,
                       const Tensor& rows64, double T, bool fsal, int64_t row_b, int64_t row_mid, double atol, double rtol,
                       int64_t order) {
  const BelowAutograd below_autograd;
  const Tensor grad_out_all = grad_out_in.contiguous();
  const int64_t seeds = grad_out_all.size(0);
  const at::Device device = grad_out_all.device();
  Tensor gy_all = at::zeros_like(grad_out_all), gf_all = at::zeros_like(grad_out_all);
  Tensor g_h = at::zeros({seeds}, grad_out_all.options().dtype(at::kDouble));
  // The stretch's seeds and their rows: everything when they are all the seeds.
  std::vector<int64_t> rows;
  for (int64_t s = 0; s < seeds; ++s) rows.push_back(s);
  Tensor index, gy = gy_all, gf = gf_all, grad_out = grad_out_all;
  std::vector<Tensor> w = w_all, acc = acc_all;
  auto scatter_back = [&]() {
    if (static_cast<int64_t>(rows.size()) == seeds) {
      gy_all = gy;
      gf_all = gf;
      return;
    }
    gy_all.index_copy_(0, index, gy);
    gf_all.index_copy_(0, index, gf);
    for (int j = 0; j < 6; ++j) acc_all[j].index_copy_(0, index, acc[j]);
  };
  for (auto it = kept.rbegin(); it != kept.rend(); ++it) {
    const Kept& attempt = *it;
    if (attempt.seeds != rows) {
      scatter_back();
      rows = attempt.seeds;
      const int64_t count = static_cast<int64_t>(rows.size());
      if (count == seeds) {
        gy = gy_all, gf = gf_all, grad_out = grad_out_all, w = w_all, acc = acc_all;
      } else {
        index = index_tensor(rows, device);
        gy = gy_all.index_select(0, index);
        gf = gf_all.index_select(0, index);
        grad_out = grad_out_all.index_select(0, index);
        // W1^T (a contiguous copy), W2^T, W3^T (transposed views) of the gathered matrices, as the whole group's
        // are: the forward pass's gathers of these seeds' rows (the same values, laid out alike).
        const std::vector<Tensor>& gathered = attempt.w;
        w = {gathered[0], gathered[1], gathered[0].transpose(-1, -2).contiguous(), gathered[2].transpose(-1, -2),
             gathered[4].transpose(-1, -2)};
        for (int j = 0; j < 6; ++j) acc[j] = acc_all[j].index_select(0, index);
        for (size_t j = 6; j < acc_all.size(); ++j) acc[j] = acc_all[j].narrow(0, 0, count);  // scratch
      }
    }
    std::vector<Tensor> interp;
    if (attempt.finishes) {
      interp = interpolant_backward(T, grad_out, attempt.y, attempt.y1, attempt.y_mid, attempt.slot[2], attempt.h_t, attempt.starts,
                                    attempt.finishing, attempt.offset, attempt.first);
      if (static_cast<int64_t>(rows.size()) == seeds) {
        g_h.add_(interp.back());
      } else {
        g_h.index_add_(0, index, interp.back());
      }
      interp.pop_back();
    }
    const std::vector<Tensor> back = attempt_backward_of(gy, gf, attempt.accepted, attempt.weights, attempt.slot[0], attempt.slot[4],
                                                         attempt.slot[1], attempt.slot[2], w, acc, fsal, row_b, row_mid, interp,
                                                         attempt.first, rows64, true);
    gy = back[0];
    gf = back[1];
    if (attempt.first) g_h.add_(back[2]);  // the first attempt runs every seed
  }
  scatter_back();
  const bool single = z0.dim() == 2;
  auto as_seeds = [single](const Tensor& t) { return single ? t.unsqueeze(0) : t; };
  Tensor g_z0 = first_step_backward(g_h, gy_all, gf_all, as_seeds(z0), as_seeds(f0), as_seeds(trial_z), as_seeds(trial_h1),
                                    as_seeds(trial_h2), as_seeds(trial_k), as_seeds(h1_first), as_seeds(h2_first), w_all, acc_all,
                                    atol, rtol, order);
  kept.clear();
  return g_z0;
}

namespace {

// index_add_ of the dense matrices' gradients (each (S, a, b), any strides, read in its row-major order as
// reshape flattens it, the pieces one after another) into out (S, total, zeros) at positions: out[s, positions[i]]
// += dense[s, i] for i in order, the additions index_add_ makes in its order (each a + 1 * b, exact as a + b).
template <typename scalar_t>
NO_FP_CONTRACT void conv_scatter(const std::vector<Tensor>& pieces, const Tensor& positions_t, Tensor& out_t) {
  NO_FP_CONTRACT_BODY
  const int64_t* positions = positions_t.data_ptr<int64_t>();
  scalar_t* out = out_t.data_ptr<scalar_t>();
  const int64_t seeds = out_t.size(0), total = out_t.size(1);
  for (int64_t s = 0; s < seeds; ++s) {
    int64_t i = 0;
    scalar_t* row = out + s * total;
    for (const Tensor& piece : pieces) {
      const scalar_t* p = piece.data_ptr<scalar_t>() + s * piece.stride(0);
      const int64_t rows = piece.size(1), columns = piece.size(2), row_stride = piece.stride(1), column_stride = piece.stride(2);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < columns; ++c) row[positions[i++]] += p[r * row_stride + c * column_stride];
    }
  }
}

}  // namespace

// The solve's gradients given dL/dz(T): dL/dz0 and the weights' (tune_node.fast.adaptive_solve's
// _DenseAdaptiveSolve.backward with _backward, the same calls): of the dense matrices W1, c1, W2, c2,
// W3, c3 (dense: W1, c1, W2, W3 as the solve had them, one model's or stacked), or, with an index
// (dense_conv_weights' gather), of the conv weights (shaped conv_shapes after the seeds).
// Here rather than in Python: that glue cost ~0.1 ms per solve.
std::vector<Tensor> Solve::gradients(const Tensor& grad_out_in, const std::vector<Tensor>& dense, const Tensor& rows64, double T,
                                     bool fsal, int64_t row_b, int64_t row_mid, double atol, double rtol, int64_t order,
                                     const std::optional<Tensor>& index, const std::vector<std::vector<int64_t>>& conv_shapes) {
  const BelowAutograd below_autograd;
  const bool single = dense[2].dim() == 2;
  auto as_seeds = [single](const Tensor& t) { return single ? t.unsqueeze(0) : t; };
  const Tensor W1 = as_seeds(dense[0]), c1 = as_seeds(dense[1]), W2 = as_seeds(dense[2]), W3 = as_seeds(dense[3]);
  const Tensor grad_out = as_seeds(grad_out_in).contiguous();
  const int64_t seeds = grad_out.size(0), batch = grad_out.size(1), width = grad_out.size(2), hidden = W2.size(-1);
  // W3's gradient accumulates transposed: MKL's fast orientation for a narrow factor.
  std::vector<Tensor> acc = {at::zeros_like(W1), at::zeros_like(W2), at::zeros({seeds, width, hidden}, grad_out.options())};
  for (int64_t k : {hidden, hidden, width}) acc.push_back(at::zeros({seeds, batch, k}, grad_out.options()));
  for (int j = 0; j < 2; ++j) acc.push_back(at::empty({seeds, batch, hidden}, grad_out.options()));
  // W1^T contiguous: the input gradient gh W1^T as the BLAS's plain product (its transposed-operand kernel sums
  // in another order), which the narrow-product loop can make.
  const std::vector<Tensor> w = {W1, c1.unsqueeze(-2), W1.transpose(-1, -2).contiguous(), W2.transpose(-1, -2), W3.transpose(-1, -2)};
  const Tensor g_z0 = backward(grad_out, w, acc, rows64, T, fsal, row_b, row_mid, atol, rtol, order);
  const std::vector<Tensor> g_dense = {acc[0], at::sum(acc[3], {-2}, true), acc[1], at::sum(acc[4], {-2}, true),
                                       acc[2].transpose(-1, -2), at::sum(acc[5], {-2}, true)};
  std::vector<Tensor> grads = {single ? g_z0.squeeze(0) : g_z0};
  if (index) {
    // dense_conv_weights' gather backward: autograd's scatter-add, the same sums in the same order.
    int64_t total = 1;  // the gather's constant zero
    for (const auto& shape : conv_shapes) total += c10::multiply_integers(shape);
    Tensor scattered = at::zeros({seeds, total}, grad_out.options());
    int64_t dense_size = 0;
    for (const Tensor& g : g_dense) dense_size += g.numel() / seeds;
    const Tensor positions = index->to(at::kLong).contiguous();
    bool in_range = positions.device().is_cpu() && positions.numel() == dense_size;
    if (in_range) {
      const int64_t* p = positions.data_ptr<int64_t>();
      for (int64_t i = 0; i < positions.numel() && in_range; ++i) in_range = p[i] >= 0 && p[i] < total;
    }
    if (plain_loops_take(scattered) && in_range) {
      AT_DISPATCH_FLOATING_TYPES(scattered.scalar_type(), "conv_scatter", [&] { conv_scatter<scalar_t>(g_dense, positions, scattered); });
    } else {
      std::vector<Tensor> flat;
      for (const Tensor& g : g_dense) flat.push_back(g.reshape({seeds, -1}));
      scattered.index_add_(-1, *index, at::cat(flat, -1));
    }
    int64_t start = 0;
    for (const auto& shape : conv_shapes) {
      const int64_t size = c10::multiply_integers(shape);
      std::vector<int64_t> full(shape);
      if (!single) full.insert(full.begin(), seeds);
      grads.push_back(scattered.narrow(-1, start, size).view(full));
      start += size;
    }
    return grads;
  }
  for (size_t j = 0; j < g_dense.size(); ++j) {
    Tensor g = j == 1 || j == 3 || j == 5 ? g_dense[j].squeeze(-2) : (j == 4 ? g_dense[j].contiguous() : g_dense[j]);
    grads.push_back(single ? g.squeeze(0) : g);
  }
  return grads;
}

// dense_conv_weights' matrices from the conv weights (the same concatenation and gather, so the same
// values), shaped dense_shapes after the seeds (stacked: leading seeds dimension on every weight).
std::vector<Tensor> dense_from_conv(const std::vector<Tensor>& conv, bool stacked, const Tensor& index,
                                    const std::vector<std::vector<int64_t>>& dense_shapes) {
  const BelowAutograd below_autograd;
  std::vector<int64_t> flat_shape = stacked ? std::vector<int64_t>{conv[0].size(0), -1} : std::vector<int64_t>{-1};
  std::vector<Tensor> parts;
  for (const Tensor& w : conv) parts.push_back(w.reshape(flat_shape));
  flat_shape.back() = 1;
  parts.push_back(at::zeros(flat_shape, conv[0].options()));
  const Tensor dense = at::cat(parts, -1).index_select(-1, index);
  std::vector<Tensor> pieces;
  int64_t start = 0;
  for (const auto& shape : dense_shapes) {
    const int64_t size = c10::multiply_integers(shape);
    std::vector<int64_t> full(shape);
    if (stacked) full.insert(full.begin(), conv[0].size(0));
    pieces.push_back(dense.narrow(-1, start, size).view(full));
    start += size;
  }
  return pieces;
}

Tensor eval_backward(const Tensor& g, const Tensor& z, const Tensor& h1, const Tensor& h2, const std::vector<Tensor>& w,
                     const std::vector<Tensor>& acc) {
  return field_backward(g, z, h1, h2, w, acc);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attempt_forward", &attempt_forward, "one attempt of tune_node.fast.adaptive_solve");
  m.def("attempt_backward", &attempt_backward, "one kept attempt's backward pass of tune_node.fast.adaptive_solve");
  m.def("eval_backward", &eval_backward, "one evaluation's backward pass of tune_node.fast.adaptive_solve");
  m.def("first_step_forward", &first_step_forward, "IController's first step size through the dense field");
  m.def("interpolate_at", &interpolate_at, "the interpolant at T of finishing steps");
  m.def("interpolant_backward", &interpolant_backward, "the interpolant's backward pass");
  m.def("first_step_backward", &first_step_backward, "the first step size's backward pass");
  m.def("solve_forward", &solve_forward, "a whole fused solve of tune_node.fast.adaptive_solve, stepped in C++");
  pybind11::class_<Solve, std::shared_ptr<Solve>>(m, "Solve")
      .def_readonly("out", &Solve::out)
      .def_readonly("slots", &Solve::slots)
      .def_readonly("nfe", &Solve::nfe)
      .def_readonly("attempts", &Solve::attempts)
      .def_readonly("accepted", &Solve::accepted)
      .def_readonly("failure", &Solve::failure)
      .def_readonly("failed_seed", &Solve::failed_seed)
      .def_readonly("failed_t", &Solve::failed_t)
      .def_readonly("failed_h", &Solve::failed_h)
      .def("backward", &Solve::backward, "the solve's backward pass")
      .def("gradients", &Solve::gradients, "the solve's gradients, of the dense or the conv weights");
  m.def("dense_from_conv", &dense_from_conv, "dense_conv_weights' gather");
  m.def(
      "set_narrow_products", [](bool on) { narrow_products_enabled.store(on); },
      "whether the narrow products run as loops where checked (TUNE_NODE_NARROW_PRODUCTS=0: not)");
  m.def(
      "narrow_product_outcomes",
      [](bool reset) {
        static const char* kinds[kNarrowKinds] = {"bmm", "accumulate", "input addmm", "input baddbmm", "output addmm", "output baddbmm"};
        static const char* outcomes[4] = {"taken", "check failed", "not the loops' operands", "no loop"};
        std::map<std::string, std::map<std::string, int64_t>> counts;
        for (int k = 0; k < kNarrowKinds; ++k)
          for (int o = 0; o < 4; ++o)
            counts[kinds[k]][outcomes[o]] = reset ? narrow_outcomes[k * 4 + o].exchange(0) : narrow_outcomes[k * 4 + o].load();
        return counts;
      },
      "per narrow-product kind, how many calls ran the loop and why the others ran ATen's call (reset: and zero the counts)",
      pybind11::arg("reset") = false);
}
