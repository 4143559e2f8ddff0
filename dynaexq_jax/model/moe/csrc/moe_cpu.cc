// The CPU kernels of the model, XLA FFI custom calls: the mixed-tier MoE op (one tier per call)
// and the dense matmul of small token counts (decode).
//
// XLA CPU has no way to read a data-dependent subset of the expert pool in place: a gather
// copies the chosen experts before the matmul reads them again, and the dense alternative
// multiplies every expert. At decode shapes both cost several times the bytes the routing
// needs. The MoE kernel streams each routed expert's weights exactly once and computes only the
// rows (tokens) routed to it. XLA CPU also multiplies 16-bit weights by widening them to an f32
// copy first, and reads a transposed operand (the tied embedding as the head) through a
// transposed copy: the matmul kernel reads both in place.
//
// Arithmetic. Float weights (f32, bf16, fp16) are widened in registers and multiplied with f32
// FMAs against f32 activations: exact up to summation order. Integer weights (int8/int4/int3/int2
// codes, fp16 scale per group of g K rows and column, and for asymmetric formats an fp16 zero
// beside each scale: w = (code - offset) * s_w + z) are multiplied with integer dot products
// against the activations quantized to int8 per block of at most 32 K rows (Mat::act_block;
// symmetric, scale = max|x| / 127, round to nearest), as the fast CPU engines do:
// y = sum_blocks s_w * s_x * sum_k (code_k - offset) * q_k (+ z * s_x * sum_k q_k). That adds at
// most |x|max / 254 of rounding per activation (cpu_kernel.py states the tolerance the tests hold
// it to). Formats whose sub-tiles (Mat::subtiles) are not whole sets of 4 rows fall back to
// dequantizing rows to f32 (exact).
//
// Instruction sets are chosen at run time: AVX-512 with VNNI, AVX2 (with FMA and F16C), or
// portable code (tiles.inc, compiled once per ISA); DynaexqSetIsa forces one (tests run each).
//
// MoE inputs (see cpu_kernel.py beside csrc/): x [T, H] f32 or bf16; slots int32 [P] (P = T * k,
// pair p belongs to token p / k; -1: the pair is served by another tier); w f32 [P] routing
// weights; gate, up [S, H(*bits/8), I] and down [S, I(*bits/8), H] in their formats, each with its
// scales (fp16 [S, K/group, N]; a dummy for float formats) and zeros (the scales' shape, or
// empty for symmetric formats); biases f32 gate/up [S, I] and down
// [S, H], all three empty when the experts have none. Attributes: the weight format of gate and up
// (kind, bits, group: they share one, read against one quantization of x) and of down (down_kind,
// down_bits, down_group), and the activation (0: SwiGLU, 1: gpt-oss's clamped SwiGLU with alpha and limit). Output: f32 [T, H],
// this tier's contribution. Weight layout and packing: pallas_kernels/packing.py (written by model/quant.py).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Kind : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kInt = 3 };

// One stack of weights [S, K, N] in one format.
struct Mat {
  const uint8_t* data;
  const _Float16* scales;  // [S, K / group, N] for kInt
  int64_t K, N;
  int kind, bits, group;
  const _Float16* zeros = nullptr;  // like scales, for asymmetric kInt formats

  // A packed block of g rows holds p sub-tiles of g/p consecutive K rows (packing.py): p = 8 / bits
  // in one plane of g/p byte rows, or for int3 p = 8 in three planes of g/8 byte rows.
  int subtiles() const { return kind != kInt ? 1 : bits == 3 ? 8 : 8 / bits; }
  int planes() const { return kind == kInt ? bits * subtiles() / 8 : 1; }
  int64_t group_rows() const { return group ? group : K; }
  int64_t set_rows() const { return group_rows() / subtiles(); }  // K rows of one sub-tile
  int64_t expert_bytes() const {
    int64_t item = kind == kF32 ? 4 : kind == kInt ? 1 : 2;
    return K / subtiles() * planes() * N * item;
  }
  // Integer dot products need each sub-tile to be whole sets of 4 rows.
  bool int_dot() const { return kind == kInt && set_rows() % 4 == 0; }
  // The activations' quantization block: the longest run of consecutive K rows that one
  // sub-tile covers, at most kActBlock (a multiple of 4 that divides g/p).
  int64_t act_block() const {
    const int64_t rows = set_rows();
    for (int64_t b = std::min<int64_t>(rows, kActBlock) / 4 * 4; b > 4; b -= 4)
      if (rows % b == 0) return b;
    return 4;
  }
  static constexpr int64_t kActBlock = 32;
};

// How many byte rows ahead the integer tiles prefetch (tiles.inc).
constexpr int64_t kPrefetchRows = 48;

// Activations quantized to int8 per block of `block` K rows, for the integer path: q [R, ld],
// and per row and block the scale and the sum of the codes (for the weights' code offset).
struct Act {
  const int8_t* q;
  const float* scale;
  const int32_t* sum;
  int64_t ld, ld_blocks, block;

  Act rows_from(int r) const {
    return {q + r * ld, scale + r * ld_blocks, sum + r * ld_blocks, ld, ld_blocks, block};
  }
};

// bf16 is the top half of an f32.
inline float bf16_value(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float weight_at(int kind, const uint8_t* w, int64_t i) {
  if (kind == kF32) return reinterpret_cast<const float*>(w)[i];
  if (kind == kBF16) return bf16_value(reinterpret_cast<const uint16_t*>(w)[i]);
  return static_cast<float>(reinterpret_cast<const _Float16*>(w)[i]);
}

// ---- the tiles, once per instruction set ---------------------------------------------------------
// Portable code: one column per tile (also the tail of the vector ISAs' column loops).
namespace generic {
using F = float;
using I = int32_t;
using Bcast = int32_t;
constexpr int L = 1, TILE = 1, NV = 1;
constexpr bool kInt8Signed = false;
inline F fzero() { return 0.0f; }
inline F fset1(float v) { return v; }
inline F fload(const float* p) { return *p; }
inline F fload_bf16(const uint16_t* p) { return bf16_value(*p); }
inline F fload_f16(const _Float16* p) { return static_cast<float>(*p); }
inline void fstore(float* p, F v) { *p = v; }
inline F fadd(F a, F b) { return a + b; }
inline F fmul(F a, F b) { return a * b; }
inline F fmadd(F a, F b, F c) { return a * b + c; }
inline F fcvt(I v) { return static_cast<float>(v); }
inline float fsum(F v) { return v; }
inline I izero() { return 0; }
inline I iset1(int32_t v) { return v; }
inline I isub(I a, I b) { return a - b; }
inline void interleave4(const uint8_t* p, int64_t stride, I* q) {
  q[0] = static_cast<int32_t>(p[0] | p[stride] << 8 | p[2 * stride] << 16 | static_cast<uint32_t>(p[3 * stride]) << 24);
}
inline I codes(I q, int shift, int mask) {
  return static_cast<int32_t>((static_cast<uint32_t>(q) >> shift) & (static_cast<uint32_t>(mask) * 0x01010101u));
}
inline I ishl(I q, int n) { return static_cast<int32_t>(static_cast<uint32_t>(q) << n); }  // of masked codes
inline I ior(I a, I b) { return a | b; }
inline Bcast bcast(int32_t x4) { return x4; }
inline void prefetch(const void* p) { __builtin_prefetch(p); }
inline I dot4(I acc, I c, Bcast x, int) {  // unsigned code bytes times signed activation bytes
  for (int b = 0; b < 4; ++b)
    acc += static_cast<int32_t>((static_cast<uint32_t>(c) >> (8 * b)) & 0xff) *
           static_cast<int8_t>((static_cast<uint32_t>(x) >> (8 * b)) & 0xff);
  return acc;
}
#include "tiles.inc"
}  // namespace generic

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#define DYNAEXQ_TARGET_BEGIN(t) _Pragma("clang attribute push(__attribute__((target(" #t "))), apply_to = function)")
#define DYNAEXQ_TARGET_END _Pragma("clang attribute pop")
#else
#define DYNAEXQ_PRAGMA(x) _Pragma(#x)
#define DYNAEXQ_TARGET_BEGIN(t) DYNAEXQ_PRAGMA(GCC push_options) DYNAEXQ_PRAGMA(GCC target(t))
#define DYNAEXQ_TARGET_END DYNAEXQ_PRAGMA(GCC pop_options)
#endif
#define DYNAEXQ_HAVE_X86 1

// Interleaving four rows of bytes so that each 32-bit lane holds one column's four bytes: the
// unpacks work within 128-bit lanes, so each row's 32-bit words are first permuted (idx[4m + j]
// = lanes * j + m) so that the results come out in column order.
DYNAEXQ_TARGET_BEGIN("avx2,fma,f16c")
namespace avx2 {
using F = __m256;
using I = __m256i;
struct Bcast {
  __m256i x, ax;
};
constexpr int L = 8, TILE = 32, NV = 4;
// maddubs saturates 16-bit pair sums: int8 codes are made signed in dot4 (|w| <= 127 against
// |q| <= 127), so the offset is already removed; int4/int2 codes are small enough as they are.
constexpr bool kInt8Signed = true;
inline F fzero() { return _mm256_setzero_ps(); }
inline F fset1(float v) { return _mm256_set1_ps(v); }
inline F fload(const float* p) { return _mm256_loadu_ps(p); }
inline F fload_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline F fload_f16(const _Float16* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline void fstore(float* p, F v) { _mm256_storeu_ps(p, v); }
inline F fadd(F a, F b) { return _mm256_add_ps(a, b); }
inline F fmul(F a, F b) { return _mm256_mul_ps(a, b); }
inline F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
inline F fcvt(I v) { return _mm256_cvtepi32_ps(v); }
inline float fsum(F v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline I izero() { return _mm256_setzero_si256(); }
inline I iset1(int32_t v) { return _mm256_set1_epi32(v); }
inline I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
inline void interleave4(const uint8_t* p, int64_t stride, I* q) {
  const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  I r[4];
  for (int i = 0; i < 4; ++i)
    r[i] = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i*)(p + i * stride)), idx);
  const I a = _mm256_unpacklo_epi8(r[0], r[1]), b = _mm256_unpackhi_epi8(r[0], r[1]);
  const I c = _mm256_unpacklo_epi8(r[2], r[3]), d = _mm256_unpackhi_epi8(r[2], r[3]);
  q[0] = _mm256_unpacklo_epi16(a, c);
  q[1] = _mm256_unpackhi_epi16(a, c);
  q[2] = _mm256_unpacklo_epi16(b, d);
  q[3] = _mm256_unpackhi_epi16(b, d);
}
inline I codes(I q, int shift, int mask) {
  return _mm256_and_si256(_mm256_srli_epi16(q, shift), _mm256_set1_epi8(static_cast<char>(mask)));
}
inline I ishl(I q, int n) { return _mm256_slli_epi16(q, n); }  // of masked codes: no carry between bytes
inline I ior(I a, I b) { return _mm256_or_si256(a, b); }
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
inline Bcast bcast(int32_t x4) {
  const __m256i x = _mm256_set1_epi32(x4);
  return {x, _mm256_abs_epi8(x)};
}
inline I dot4(I acc, I c, const Bcast& x, int bits) {
  __m256i pairs;
  if (bits == 8)  // |q| * (w * sign(q)), w = code - 128
    pairs = _mm256_maddubs_epi16(x.ax, _mm256_sign_epi8(_mm256_xor_si256(c, _mm256_set1_epi8(-128)), x.x));
  else
    pairs = _mm256_maddubs_epi16(c, x.x);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#include "tiles.inc"
}  // namespace avx2
DYNAEXQ_TARGET_END

DYNAEXQ_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace avx512 {
using F = __m512;
using I = __m512i;
using Bcast = __m512i;
constexpr int L = 16, TILE = 64, NV = 4;
constexpr bool kInt8Signed = false;  // vpdpbusd: unsigned codes times signed bytes, no saturation
inline F fzero() { return _mm512_setzero_ps(); }
inline F fset1(float v) { return _mm512_set1_ps(v); }
inline F fload(const float* p) { return _mm512_loadu_ps(p); }
inline F fload_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline F fload_f16(const _Float16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline void fstore(float* p, F v) { _mm512_storeu_ps(p, v); }
inline F fadd(F a, F b) { return _mm512_add_ps(a, b); }
inline F fmul(F a, F b) { return _mm512_mul_ps(a, b); }
inline F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
inline F fcvt(I v) { return _mm512_cvtepi32_ps(v); }
inline float fsum(F v) { return _mm512_reduce_add_ps(v); }
inline I izero() { return _mm512_setzero_si512(); }
inline I iset1(int32_t v) { return _mm512_set1_epi32(v); }
inline I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
inline void interleave4(const uint8_t* p, int64_t stride, I* q) {
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  I r[4];
  for (int i = 0; i < 4; ++i) r[i] = _mm512_permutexvar_epi32(idx, _mm512_loadu_si512(p + i * stride));
  const I a = _mm512_unpacklo_epi8(r[0], r[1]), b = _mm512_unpackhi_epi8(r[0], r[1]);
  const I c = _mm512_unpacklo_epi8(r[2], r[3]), d = _mm512_unpackhi_epi8(r[2], r[3]);
  q[0] = _mm512_unpacklo_epi16(a, c);
  q[1] = _mm512_unpackhi_epi16(a, c);
  q[2] = _mm512_unpacklo_epi16(b, d);
  q[3] = _mm512_unpackhi_epi16(b, d);
}
inline I codes(I q, int shift, int mask) {
  return _mm512_and_si512(_mm512_srli_epi16(q, shift), _mm512_set1_epi8(static_cast<char>(mask)));
}
inline I ishl(I q, int n) { return _mm512_slli_epi16(q, n); }  // of masked codes: no carry between bytes
inline I ior(I a, I b) { return _mm512_or_si512(a, b); }
inline Bcast bcast(int32_t x4) { return _mm512_set1_epi32(x4); }
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
inline I dot4(I acc, I c, Bcast x, int) { return _mm512_dpbusd_epi32(acc, c, x); }
#include "tiles.inc"
}  // namespace avx512
DYNAEXQ_TARGET_END
#endif

// ---- choosing the instruction set ----------------------------------------------------------------
struct Isa {
  const char* name;
  int tile;
  void (*tile_float)(const Mat&, const uint8_t*, const float*, int, int64_t, int64_t, float*, int64_t);
  void (*tile_int)(const Mat&, const uint8_t*, const _Float16*, const _Float16*, const Act&, int, int64_t, float*,
                   int64_t);
  void (*tile_dot_t)(int, const uint8_t*, int64_t, const float*, int, int64_t, int64_t, float*, int64_t);
  void (*stream_float)(const Mat&, const uint8_t*, const float*, int, int64_t, int64_t, int64_t, float*, int64_t);
};

const Isa kGeneric{"generic", generic::TILE, generic::tile_float, generic::tile_int, generic::tile_dot_t, generic::stream_float};
#ifdef DYNAEXQ_HAVE_X86
const Isa kAvx2{"avx2", avx2::TILE, avx2::tile_float, avx2::tile_int, avx2::tile_dot_t, avx2::stream_float};
const Isa kAvx512{"avx512", avx512::TILE, avx512::tile_float, avx512::tile_int, avx512::tile_dot_t, avx512::stream_float};
#endif

// The ISAs this CPU runs, best first.
std::vector<const Isa*> supported() {
  std::vector<const Isa*> out;
#ifdef DYNAEXQ_HAVE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))
    out.push_back(&kAvx512);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    out.push_back(&kAvx2);
#endif
  out.push_back(&kGeneric);
  return out;
}

std::atomic<const Isa*> g_isa{nullptr};

const Isa& isa() {
  const Isa* chosen = g_isa.load(std::memory_order_acquire);
  if (!chosen) {
    chosen = supported().front();
    g_isa.store(chosen, std::memory_order_release);
  }
  return *chosen;
}

}  // namespace

// For cpu_kernel.py (ctypes): the ISA in use, and forcing one by name ("" = the best); returns 0
// when this CPU cannot run the one asked for.
extern "C" const char* DynaexqCpuIsa() { return isa().name; }
extern "C" const char* DynaexqCpuIsas() {
  static std::string names = [] {
    std::string s;
    for (const Isa* i : supported()) s += (s.empty() ? "" : ",") + std::string(i->name);
    return s;
  }();
  return names.c_str();
}
extern "C" int DynaexqSetIsa(const char* name) {
  for (const Isa* i : supported())
    if (!*name || name == std::string(i->name)) {
      g_isa.store(i, std::memory_order_release);
      return 1;
    }
  return 0;
}

namespace {
// ---- dequantizing fallback (integer groups that are not whole sets of 4 byte rows) --------------
// acc[r, :] += sum_k a[r, k] * W_e[k, :] for r < R: each weight row dequantized into `rows` and
// applied in passes of up to 4 rows.
constexpr int kRowsPerPass = 4;

void apply(const float* const* w, const int64_t* ks, int n_rows, const float* a, int R, int64_t K, int64_t N,
           float* acc) {
  for (int r = 0; r < R; ++r) {
    float* out = acc + r * N;
    const float* ar = a + r * K;
    for (int j = 0; j < n_rows; ++j) {
      const float c = ar[ks[j]];
      const float* wj = w[j];
      for (int64_t n = 0; n < N; ++n) out[n] += c * wj[n];
    }
  }
}

// Sub-tile j's code (offset-binary) of column n, from byte row r of a block's plane 0 (its other
// planes `plane` bytes apart): packing.py's layout.
inline int code_at(const uint8_t* row, int64_t plane, int bits, int j, int64_t n) {
  if (bits == 3)  // low 2 bits in plane j / 4, the high bit in plane 2
    return ((row[(j / 4) * plane + n] >> (2 * (j % 4))) & 3) | (((row[2 * plane + n] >> j) & 1) << 2);
  return (row[n] >> (j * bits)) & ((1 << bits) - 1);
}

void accumulate_dequantized(const Mat& m, int64_t e, const float* a, int R, float* acc, float* rows) {
  const int64_t K = m.K, N = m.N;
  const uint8_t* base = m.data + e * m.expert_bytes();
  const float* w[kRowsPerPass];
  int64_t ks[kRowsPerPass];
  int filled = 0;
  // Codes are packed within each block of g rows: sub-tile j of byte row r is K row r + j * g/p
  // (j < p); every block has one scale row.
  const int p = m.subtiles(), bits = m.bits;
  const int64_t g = m.group_rows(), set = g / p, block_rows = set * m.planes();
  const int offset = 1 << (bits - 1);
  const _Float16* sc_e = m.scales + e * (K / g) * N;
  const _Float16* z_e = m.zeros ? m.zeros + e * (K / g) * N : nullptr;
  for (int64_t blk = 0; blk < K / g; ++blk)
    for (int64_t r = 0; r < set; ++r) {
      const uint8_t* bytes = base + (blk * block_rows + r) * N;
      for (int j = 0; j < p; ++j) {
        float* row = rows + filled * N;
        for (int64_t n = 0; n < N; ++n)
          row[n] = static_cast<float>(code_at(bytes, set * N, bits, j, n) - offset) *
                       static_cast<float>(sc_e[blk * N + n]) +
                   (z_e ? static_cast<float>(z_e[blk * N + n]) : 0.0f);
        w[filled] = row;
        ks[filled++] = blk * g + j * set + r;
        if (filled == kRowsPerPass) apply(w, ks, filled, a, R, K, N, acc), filled = 0;
      }
    }
  if (filled) apply(w, ks, filled, a, R, K, N, acc);
}

// ---- one matrix against R activation rows ----------------------------------------------------------
// Quantize a [R, K] to int8 per block of g along K (symmetric, scale max|x| / 127) into q [R*K],
// scale and sum [R*K/g].
Act quantize(const float* a, int R, int64_t K, int64_t g, int8_t* q, float* scale, int32_t* sum) {
  const int64_t blocks = K / g;
  for (int64_t b = 0; b < R * blocks; ++b) {
    const float* x = a + b * g;
    float amax = 0.0f;
    for (int64_t i = 0; i < g; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t total = 0;
    for (int64_t i = 0; i < g; ++i) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(x[i] * inv));
      q[b * g + i] = static_cast<int8_t>(v);
      total += v;
    }
    scale[b] = amax / 127.0f;
    sum[b] = total;
  }
  return Act{q, scale, sum, K, blocks, g};
}

// out [R, N] += a [R, K] @ W_e, columns [n_begin, n_end) (multiples of the ISA's tile, but for
// the last range). act: a quantized for an integer matrix with int_dot().
void matmul_columns(const Mat& m, int64_t e, const float* a, const Act* act, int R, float* out, int64_t n_begin,
                    int64_t n_end) {
  const Isa& simd = isa();
  const uint8_t* base = m.data + e * m.expert_bytes();
  const int64_t full = n_begin + (n_end - n_begin) / simd.tile * simd.tile;
  if (m.kind == kInt) {
    const int64_t per_expert = (m.K / m.group_rows()) * m.N;
    const _Float16 *sc = m.scales + e * per_expert, *z = m.zeros ? m.zeros + e * per_expert : nullptr;
    int64_t n = n_begin;
    for (; n < full; n += simd.tile) simd.tile_int(m, base, sc, z, *act, R, n, out, m.N);
    for (; n < n_end; ++n) kGeneric.tile_int(m, base, sc, z, *act, R, n, out, m.N);
  } else if (R < 4) {  // few rows: stream W in address order (its bytes bound the time)
    simd.stream_float(m, base, a, R, m.K, n_begin, full, out, m.N);
    for (int64_t n = full; n < n_end; ++n) kGeneric.tile_float(m, base, a, R, m.K, n, out, m.N);
  } else {
    int64_t n = n_begin;
    for (; n < full; n += simd.tile) simd.tile_float(m, base, a, R, m.K, n, out, m.N);
    for (; n < n_end; ++n) kGeneric.tile_float(m, base, a, R, m.K, n, out, m.N);
  }
}

// Column ranges of an N-column product for up to `want` threads: whole tiles each (the dequantizing
// fallback, one range: it streams whole rows). Returns the range starts, N last.
std::vector<int64_t> column_ranges(const Mat& m, int want) {
  const int64_t tile = isa().tile, tiles = std::max<int64_t>(1, m.N / tile);
  const int64_t parts = (m.kind == kInt && !m.int_dot()) ? 1 : std::min<int64_t>(want, tiles);
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < parts; ++i) starts.push_back(tiles * i / parts * tile);
  starts.push_back(m.N);
  return starts;
}

// out [R, N] += a [R, K] @ W_e over columns [n_begin, n_end) (from column_ranges); a_q: a quantized
// (integer formats with int_dot(), else unused); rows: scratch of kRowsPerPass * N floats for
// the dequantizing fallback.
void matmul_range(const Mat& m, int64_t e, const float* a, const Act* a_q, int R, float* out, int64_t n_begin,
                  int64_t n_end, float* rows) {
  if (m.kind == kInt && !m.int_dot()) accumulate_dequantized(m, e, a, R, out, rows);
  else matmul_columns(m, e, a, a_q, R, out, n_begin, n_end);
}

// The kernels' parallel loops run on a pool of their own: XLA's intra-op pool wakes a sleeping
// thread per task, which on these machines takes longer than one of a decode step's matmuls.
// These workers spin for kSpin after each loop before they sleep, so that the loops of a step,
// microseconds apart, find them awake (as llama.cpp's do). Each loop's state is its own (a
// worker late for one loop finds it done and touches nothing of the next), and the caller
// works too, so a loop finishes even when no worker comes.
class Workers {
 public:
  // The pool, with threads - 1 workers (created on first use: XLA's pool size, the cores it may use).
  static Workers& get(int threads) {
    static Workers* pool = new Workers(std::max(1, threads) - 1);  // never destroyed: workers outlive exit
    return *pool;
  }
  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // f(0..n-1) on the workers and the calling thread; returns when all are done.
  void run(int n, const std::function<void(int)>& f) {
    if (n <= 1 || workers_.empty()) {
      for (int i = 0; i < n; ++i) f(i);
      return;
    }
    auto loop = std::make_shared<Loop>(n, f);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = loop;
      epoch_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    loop->work();
    while (loop->done.load(std::memory_order_acquire) < n) pause();
  }

 private:
  struct Loop {
    Loop(int n, const std::function<void(int)>& f) : n(n), f(f) {}
    void work() {
      for (int i; (i = next.fetch_add(1)) < n;) {
        f(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
    std::atomic<int> next{0}, done{0};
    const int n;
    const std::function<void(int)> f;
  };
  static constexpr auto kSpin = std::chrono::microseconds(300);

  static void pause() {
#if defined(__x86_64__)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

  explicit Workers(int n) {
    for (int i = 0; i < n; ++i) workers_.emplace_back([this] { serve(); });
    for (auto& t : workers_) t.detach();
  }

  void serve() {
    uint64_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (epoch_.load(std::memory_order_acquire) == seen) {
        if (++spins % 1024 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
          break;
        }
        pause();
      }
      std::shared_ptr<Loop> loop;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        loop = current_;
        seen = epoch_.load(std::memory_order_acquire);
      }
      if (loop) loop->work();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> epoch_{0};
  std::shared_ptr<Loop> current_;
};

ffi::Error check_mat(const char* name, const ffi::AnyBuffer& data, const ffi::AnyBuffer& scales,
                     const ffi::AnyBuffer& zeros, int kind, int bits, int group, int64_t S, int64_t K, int64_t N,
                     Mat* m) {
  auto d = data.dimensions();
  const int p = kind != kInt ? 1 : bits == 3 ? 8 : 8 / bits;  // Mat::subtiles
  const int64_t packed = kind == kInt ? K * bits / 8 : K;
  ffi::DataType want = kind == kF32 ? ffi::F32 : kind == kBF16 ? ffi::BF16 : kind == kF16 ? ffi::F16 : ffi::U8;
  if (d.size() != 3 || d[0] != S || d[1] != packed || d[2] != N || data.element_type() != want)
    return ffi::Error::InvalidArgument(std::string(name) + ": weights do not match the format and shapes");
  const int64_t g = group ? group : K;
  if (kind == kInt) {
    auto s = scales.dimensions();
    if (K % g || g % p || s.size() != 3 || s[0] != S || s[1] != K / g || s[2] != N ||
        scales.element_type() != ffi::F16)
      return ffi::Error::InvalidArgument(std::string(name) + ": scales do not match the format and shapes");
  }
  const bool has_zeros = zeros.element_count() != 0;
  if (has_zeros && (kind != kInt || zeros.dimensions().size() != 3 || zeros.element_type() != ffi::F16 ||
                    zeros.element_count() != S * (K / g) * N))
    return ffi::Error::InvalidArgument(std::string(name) + ": zeros must be the scales' shape and dtype, or empty");
  *m = Mat{static_cast<const uint8_t*>(data.untyped_data()),
           static_cast<const _Float16*>(scales.untyped_data()), K, N, kind, bits, group,
           has_zeros ? static_cast<const _Float16*>(zeros.untyped_data()) : nullptr};
  return ffi::Error::Success();
}

// Activations as f32: bf16 ones widened into `widened`, f32 ones read in place.
const float* as_f32(const ffi::AnyBuffer& x, std::vector<float>& widened) {
  if (x.element_type() == ffi::F32) return static_cast<const float*>(x.untyped_data());
  const int64_t n = x.element_count();
  widened.resize(n);
  const uint16_t* src = static_cast<const uint16_t*>(x.untyped_data());
  for (int64_t i = 0; i < n; ++i) widened[i] = bf16_value(src[i]);
  return widened.data();
}

// Below this many weight bytes a call runs on the calling thread alone: sharing it costs more.
constexpr int64_t kParallelBytes = 64 * 1024;

ffi::Error MoeTierImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> slots,
                       ffi::Buffer<ffi::F32> weights, ffi::AnyBuffer gate, ffi::AnyBuffer gate_s, ffi::AnyBuffer gate_z,
                       ffi::AnyBuffer up, ffi::AnyBuffer up_s, ffi::AnyBuffer up_z, ffi::AnyBuffer down,
                       ffi::AnyBuffer down_s, ffi::AnyBuffer down_z,
                       ffi::Buffer<ffi::F32> gate_b, ffi::Buffer<ffi::F32> up_b, ffi::Buffer<ffi::F32> down_b,
                       ffi::ResultBuffer<ffi::F32> out, int32_t kind, int32_t bits, int32_t group,
                       int32_t down_kind, int32_t down_bits, int32_t down_group, int32_t act, float alpha,
                       float limit) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || (x.element_type() != ffi::F32 && x.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument("x must be f32 or bf16 [T, H]");
  for (auto [kd, b] : {std::pair{kind, bits}, std::pair{down_kind, down_bits}})
    if (kd < kF32 || kd > kInt || (kd == kInt && b != 8 && b != 4 && b != 3 && b != 2))
      return ffi::Error::InvalidArgument("unknown weight format");
  const int64_t T = xd[0], H = xd[1], P = slots.element_count();
  if (weights.element_count() != P || T == 0 || P % T)
    return ffi::Error::InvalidArgument("slots and weights must be [T * k]");
  if (gate.dimensions().size() != 3) return ffi::Error::InvalidArgument("gate: weights must be [S, K, N]");
  const int64_t k = P / T, S = gate.dimensions()[0], I = gate.dimensions()[2];
  Mat mg, mu, md;
  for (auto err : {check_mat("gate", gate, gate_s, gate_z, kind, bits, group, S, H, I, &mg),
                   check_mat("up", up, up_s, up_z, kind, bits, group, S, H, I, &mu),
                   check_mat("down", down, down_s, down_z, down_kind, down_bits, down_group, S, I, H, &md)})
    if (err.failure()) return err;
  if (act != 0 && act != 1) return ffi::Error::InvalidArgument("unknown activation");
  const bool bias = gate_b.element_count() != 0;
  if (bias && (gate_b.element_count() != S * I || up_b.element_count() != S * I || down_b.element_count() != S * H))
    return ffi::Error::InvalidArgument("biases must be gate/up [S, I] and down [S, H], or all empty");
  const float *gb = gate_b.typed_data(), *ub = up_b.typed_data(), *db = down_b.typed_data();

  // Pairs grouped by slot: each routed expert is one work item over its pairs.
  const int32_t* slot = slots.typed_data();
  std::vector<std::vector<int64_t>> pairs_of(S);
  for (int64_t p = 0; p < P; ++p) {
    if (slot[p] < 0) continue;
    if (slot[p] >= S) return ffi::Error::InvalidArgument("slot out of range");
    pairs_of[slot[p]].push_back(p);
  }
  std::vector<int> hit;
  for (int64_t s = 0; s < S; ++s)
    if (!pairs_of[s].empty()) hit.push_back(static_cast<int>(s));
  float* o = out->typed_data();
  std::fill(o, o + T * H, 0.0f);
  if (hit.empty()) return ffi::Error::Success();

  std::vector<float> x_widened;
  const float* xf = as_f32(x, x_widened);
  const float* w = weights.typed_data();

  // Every routed slot's rows, in one arena: its tokens a [R, H], gate g and up u [R, I] (g then
  // holds the gated activation h), its output y [R, H], and the int8 activations of a and h.
  struct Slot {
    int s, R;
    float *a, *g, *u, *y;
    Act a_q, h_q;
    int8_t* h_codes;  // where h_q goes
    float* h_scale;
    int32_t* h_sum;
  };
  const int64_t rows = [&] { int64_t n = 0; for (int s : hit) n += pairs_of[s].size(); return n; }();
  std::vector<float> arena(rows * (2 * H + 2 * I), 0.0f);
  std::vector<int8_t> codes(mg.int_dot() || md.int_dot() ? rows * (H + I) : 0);
  const int64_t a_blocks = mg.int_dot() ? H / mg.act_block() : 0, h_blocks = md.int_dot() ? I / md.act_block() : 0;
  std::vector<float> act_scale(rows * (a_blocks + h_blocks));
  std::vector<int32_t> act_sum(rows * (a_blocks + h_blocks));
  std::vector<Slot> slots_hit;
  {
    float* f = arena.data();
    int8_t* q = codes.data();
    float* sc = act_scale.data();
    int32_t* sm = act_sum.data();
    for (int s : hit) {
      const int R = static_cast<int>(pairs_of[s].size());
      Slot slot{s, R, f, f + R * H, f + R * (H + I), f + R * (H + 2 * I), {}, {}, q, sc, sm};
      f += R * (2 * H + 2 * I);
      for (int r = 0; r < R; ++r) std::memcpy(&slot.a[r * H], &xf[pairs_of[s][r] / k * H], H * 4);
      if (mg.int_dot()) {  // gate and up: one format
        slot.a_q = quantize(slot.a, R, H, mg.act_block(), q, sc, sm);
        q += R * H, sc += R * a_blocks, sm += R * a_blocks;
      }
      slot.h_codes = q, slot.h_scale = sc, slot.h_sum = sm;  // h_q's storage, filled once h exists
      if (md.int_dot()) q += R * I, sc += R * h_blocks, sm += R * h_blocks;
      slots_hit.push_back(slot);
    }
  }

  // Two parallel phases: every slot's gate and up products in column ranges, then (the gated
  // activation between, per slot) every slot's down product in column ranges. Enough ranges
  // for every thread to stream its share of the routed weights, when they are worth a thread.
  const int64_t routed_bytes = static_cast<int64_t>(hit.size()) * (2 * mg.expert_bytes() + md.expert_bytes());
  Workers& workers = Workers::get(pool.num_threads());
  const int threads = routed_bytes < kParallelBytes ? 1 : workers.threads();
  const int n_slots = static_cast<int>(slots_hit.size());
  const std::vector<int64_t> gu = column_ranges(mg, (threads + 2 * n_slots - 1) / (2 * n_slots));
  const std::vector<int64_t> dn = column_ranges(md, (threads + n_slots - 1) / n_slots);
  const int n_gu = static_cast<int>(gu.size()) - 1, n_dn = static_cast<int>(dn.size()) - 1;
  // The dequantizing fallback's row scratch, one per work item (of either phase).
  const bool fallback = (mg.kind == kInt && !mg.int_dot()) || (md.kind == kInt && !md.int_dot());
  const int64_t row_floats = kRowsPerPass * std::max(H, I);
  std::vector<float> fallback_rows(fallback ? row_floats * n_slots * std::max(2 * n_gu, n_dn) : 0);
  auto rows_of = [&](int item) { return fallback_rows.data() + (fallback ? item * row_floats : 0); };
  workers.run(n_slots * 2 * n_gu, [&](int item) {
    const int i = item / (2 * n_gu), part = item % n_gu;
    const Slot& sl = slots_hit[i];
    const bool is_up = item % (2 * n_gu) >= n_gu;
    matmul_range(is_up ? mu : mg, sl.s, sl.a, &sl.a_q, sl.R, is_up ? sl.u : sl.g, gu[part], gu[part + 1],
                 rows_of(item));
  });
  for (Slot& sl : slots_hit) {
    const int s = sl.s;
    for (int r = 0; r < sl.R; ++r) {
      const float wr = w[pairs_of[s][r]];
      float *g = sl.g + r * I, *u = sl.u + r * I;
      for (int64_t i = 0; i < I; ++i) {
        float gi = g[i], ui = u[i];
        if (bias) gi += gb[s * I + i], ui += ub[s * I + i];
        if (act == 0) {
          g[i] = gi / (1.0f + std::exp(-gi)) * ui * wr;  // silu(gate) * up * weight
        } else {  // clamped SwiGLU: gate clamped above, up on both sides
          gi = std::min(gi, limit);
          ui = std::min(std::max(ui, -limit), limit);
          g[i] = gi / (1.0f + std::exp(-alpha * gi)) * (ui + 1.0f) * wr;
        }
      }
    }
    if (md.int_dot()) sl.h_q = quantize(sl.g, sl.R, I, md.act_block(), sl.h_codes, sl.h_scale, sl.h_sum);
  }
  workers.run(n_slots * n_dn, [&](int item) {
    const Slot& sl = slots_hit[item / n_dn];
    const int part = item % n_dn;
    matmul_range(md, sl.s, sl.g, &sl.h_q, sl.R, sl.y, dn[part], dn[part + 1], rows_of(item));
  });
  std::vector<float> y(P * H, 0.0f);  // per-pair outputs, summed per token below in pair order
  for (const Slot& sl : slots_hit)
    for (int r = 0; r < sl.R; ++r) {
      const int64_t p = pairs_of[sl.s][r];
      float* yp = &y[p * H];
      std::memcpy(yp, &sl.y[r * H], H * 4);
      if (bias)  // weight * (h @ down + bias): the weight is already in h
        for (int64_t h = 0; h < H; ++h) yp[h] += w[p] * db[sl.s * H + h];
    }

  for (int64_t p = 0; p < P; ++p) {
    if (slot[p] < 0) continue;
    float* ot = o + p / k * H;
    const float* yp = &y[p * H];
    for (int64_t h = 0; h < H; ++h) ot[h] += yp[h];
  }
  return ffi::Error::Success();
}

// y [T, N] = x [T, K] @ W, W f32 / bf16 / fp16 [K, N], or [N, K] read transposed (transposed=1).
// The output columns are split into one range per thread, each thread streaming its part of W
// once: one core alone cannot read memory (or L3) as fast as the cores together.
ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::ResultBuffer<ffi::F32> out,
                      int32_t transposed) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || (x.element_type() != ffi::F32 && x.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument("x must be f32 or bf16 [T, K]");
  const int kind = w.element_type() == ffi::F32 ? kF32 : w.element_type() == ffi::BF16 ? kBF16
                   : w.element_type() == ffi::F16 ? kF16 : -1;
  if (kind < 0 || wd.size() != 2) return ffi::Error::InvalidArgument("w must be f32, bf16 or fp16 [K, N]");
  const int64_t T = xd[0], K = xd[1], N = transposed ? wd[0] : wd[1];
  if ((transposed ? wd[1] : wd[0]) != K) return ffi::Error::InvalidArgument("x and w do not match");
  std::vector<float> x_widened;
  const float* a = as_f32(x, x_widened);
  float* o = out->typed_data();
  const uint8_t* wb = static_cast<const uint8_t*>(w.untyped_data());
  const Mat m{wb, nullptr, K, N, kind, 0, 0};
  const int64_t item = kind == kF32 ? 4 : 2;
  Workers& workers = Workers::get(pool.num_threads());
  const int threads = K * N * item < kParallelBytes ? 1 : workers.threads();
  if (transposed) {  // rows of Wt, in blocks of 4 (tile_dot_t's)
    const int64_t blocks = (N + 3) / 4, parts = std::min<int64_t>(threads, blocks);
    workers.run(static_cast<int>(parts), [&](int i) {
      isa().tile_dot_t(kind, wb, K, a, static_cast<int>(T), blocks * i / parts * 4,
                       std::min(N, blocks * (i + 1) / parts * 4), o, N);
    });
  } else {
    std::fill(o, o + T * N, 0.0f);
    const std::vector<int64_t> ranges = column_ranges(m, threads);
    workers.run(static_cast<int>(ranges.size()) - 1, [&](int i) {
      matmul_columns(m, 0, a, nullptr, static_cast<int>(T), o, ranges[i], ranges[i + 1]);
    });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DynaexqMoeTier, MoeTierImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()            // x
                                  .Arg<ffi::Buffer<ffi::S32>>()     // slots
                                  .Arg<ffi::Buffer<ffi::F32>>()     // weights
                                  .Arg<ffi::AnyBuffer>()            // gate
                                  .Arg<ffi::AnyBuffer>()            // gate scales
                                  .Arg<ffi::AnyBuffer>()            // gate zeros (or empty)
                                  .Arg<ffi::AnyBuffer>()            // up
                                  .Arg<ffi::AnyBuffer>()            // up scales
                                  .Arg<ffi::AnyBuffer>()            // up zeros (or empty)
                                  .Arg<ffi::AnyBuffer>()            // down
                                  .Arg<ffi::AnyBuffer>()            // down scales
                                  .Arg<ffi::AnyBuffer>()            // down zeros (or empty)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // gate bias (or empty)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // up bias (or empty)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // down bias (or empty)
                                  .Ret<ffi::Buffer<ffi::F32>>()     // out
                                  .Attr<int32_t>("kind")
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("group")
                                  .Attr<int32_t>("down_kind")
                                  .Attr<int32_t>("down_bits")
                                  .Attr<int32_t>("down_group")
                                  .Attr<int32_t>("act")
                                  .Attr<float>("alpha")
                                  .Attr<float>("limit"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DynaexqMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()            // x
                                  .Arg<ffi::AnyBuffer>()            // w
                                  .Ret<ffi::Buffer<ffi::F32>>()     // out
                                  .Attr<int32_t>("transposed"));
