// The CPU kernel of the mixed-tier MoE op (one tier per call), an XLA FFI custom call.
//
// XLA CPU has no way to read a data-dependent subset of the expert pool in place: a gather
// copies the chosen experts before the matmul reads them again, and the dense alternative
// multiplies every expert. At decode shapes both cost several times the bytes the routing
// needs. This kernel streams each routed expert's weights exactly once, dequantizing rows on
// the fly, and computes only the rows (tokens) routed to it.
//
// Inputs (see cpu_kernel.py beside csrc/): x [T, H] f32 or bf16; slots int32 [P] (P = T * k,
// pair p belongs to token p / k; -1: the pair is served by another tier); w f32 [P] routing
// weights; gate, up [S, H(/p), I] and down [S, I(/p), H] in the tier's format, each with its
// scales (fp16 [S, K/group, N]; a dummy for float formats); biases f32 gate/up [S, I] and down
// [S, H], all three empty when the experts have none. Attributes: the weight format, and the
// activation (0: SwiGLU, 1: gpt-oss's clamped SwiGLU with alpha and limit). Output: f32 [T, H],
// this tier's contribution. Weight layout and packing: pallas_kernels/packing.py (written by model/quant.py).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Kind : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kInt = 3 };

// One stack of expert weights [S, K, N] in one format.
struct Mat {
  const uint8_t* data;
  const _Float16* scales;  // [S, K / group, N] for kInt
  int64_t K, N;
  int kind, bits, group;

  int per_byte() const { return kind == kInt ? 8 / bits : 1; }
  int64_t expert_bytes() const {
    int64_t item = kind == kF32 ? 4 : kind == kInt ? 1 : 2;
    return K / per_byte() * N * item;
  }
};

// bf16 is the top half of an f32.
void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(&dst[i], &bits, 4);
  }
}

// acc[r, :] += sum_k a[r, k] * W_e[k, :] for r < R; a is [R, K], acc [R, N] (row-major).
// Weight rows are read once (dequantized into `rows` first unless f32) and applied in groups of
// up to 4, so each pass over an accumulator row carries four rows' worth of FMAs.
constexpr int kRowsPerPass = 4;

void apply(const float* const* w, const int64_t* ks, int n_rows, const float* a, int R, int64_t K, int64_t N,
           float* acc) {
  for (int r = 0; r < R; ++r) {
    float* out = acc + r * N;
    const float* ar = a + r * K;
    if (n_rows == 4) {
      const float c0 = ar[ks[0]], c1 = ar[ks[1]], c2 = ar[ks[2]], c3 = ar[ks[3]];
      const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
      for (int64_t n = 0; n < N; ++n) out[n] += c0 * w0[n] + c1 * w1[n] + c2 * w2[n] + c3 * w3[n];
    } else {
      for (int j = 0; j < n_rows; ++j) {
        const float c = ar[ks[j]];
        const float* wj = w[j];
        for (int64_t n = 0; n < N; ++n) out[n] += c * wj[n];
      }
    }
  }
}

// rows: scratch of kRowsPerPass * N floats.
void accumulate(const Mat& m, int64_t e, const float* a, int R, float* acc, float* rows) {
  const int64_t K = m.K, N = m.N;
  const uint8_t* base = m.data + e * m.expert_bytes();
  const float* w[kRowsPerPass];
  int64_t ks[kRowsPerPass];
  int filled = 0;
  auto push = [&](int64_t k, const float* row) {  // queue row k; apply when the pass is full
    w[filled] = row;
    ks[filled++] = k;
    if (filled == kRowsPerPass) {
      apply(w, ks, filled, a, R, K, N, acc);
      filled = 0;
    }
  };
  auto slot = [&]() { return rows + filled * N; };  // where the next dequantized row goes
  if (m.kind == kF32) {
    const float* src = reinterpret_cast<const float*>(base);
    for (int64_t k = 0; k < K; ++k) push(k, src + k * N);
  } else if (m.kind == kBF16) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(base);
    for (int64_t k = 0; k < K; ++k) {
      float* row = slot();
      bf16_to_f32(src + k * N, row, N);
      push(k, row);
    }
  } else if (m.kind == kF16) {
    const _Float16* src = reinterpret_cast<const _Float16*>(base);
    for (int64_t k = 0; k < K; ++k) {
      float* row = slot();
      for (int64_t n = 0; n < N; ++n) row[n] = static_cast<float>(src[k * N + n]);
      push(k, row);
    }
  } else {
    // Sub-byte codes are packed within each block of g rows: byte row r of the block holds rows
    // r + j * g/p at bit offset j * bits (j < p); every block has one scale row.
    const int p = m.per_byte(), bits = m.bits;
    const int64_t g = m.group ? m.group : K, rows_per_block = g / p;
    const int mask = (1 << bits) - 1, offset = 1 << (bits - 1);
    const _Float16* sc_e = m.scales + e * (K / g) * N;
    std::vector<float> scale(N);
    for (int64_t blk = 0; blk < K / g; ++blk) {
      for (int64_t n = 0; n < N; ++n) scale[n] = static_cast<float>(sc_e[blk * N + n]);
      for (int64_t r = 0; r < rows_per_block; ++r) {
        const uint8_t* bytes = base + (blk * rows_per_block + r) * N;
        for (int j = 0; j < p; ++j) {
          const int shift = j * bits;
          float* row = slot();
          for (int64_t n = 0; n < N; ++n)
            row[n] = static_cast<float>(((bytes[n] >> shift) & mask) - offset) * scale[n];
          push(blk * g + j * rows_per_block + r, row);
        }
      }
    }
  }
  if (filled) apply(w, ks, filled, a, R, K, N, acc);
}

// Runs f(0..n-1) on the calling thread and XLA's intra-op pool. The state is shared so that a
// pool task that starts after every item is done (all taken by others) touches nothing on this
// stack; the caller only waits for items that are already running, so it cannot deadlock when
// the pool is busy.
void parallel_for(ffi::ThreadPool& pool, int n, const std::function<void(int)>& f) {
  struct State {
    std::atomic<int> next{0}, done{0};
    int n;
    std::function<void(int)> f;
  };
  auto st = std::make_shared<State>();
  st->n = n;
  st->f = f;
  auto work = [st] {
    for (int i; (i = st->next.fetch_add(1)) < st->n;) {
      st->f(i);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  // The calling thread works too: with it, at most one thread per core of the pool.
  const int helpers = std::min<int64_t>(n, pool.num_threads()) - 1;
  for (int i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

ffi::Error check_mat(const char* name, const ffi::AnyBuffer& data, const ffi::AnyBuffer& scales, int kind,
                     int bits, int group, int64_t S, int64_t K, int64_t N, Mat* m) {
  auto d = data.dimensions();
  const int p = kind == kInt ? 8 / bits : 1;
  ffi::DataType want = kind == kF32 ? ffi::F32 : kind == kBF16 ? ffi::BF16 : kind == kF16 ? ffi::F16 : ffi::U8;
  if (d.size() != 3 || d[0] != S || d[1] * p != K || d[2] != N || data.element_type() != want)
    return ffi::Error::InvalidArgument(std::string(name) + ": weights do not match the format and shapes");
  const int64_t g = group ? group : K;
  if (kind == kInt) {
    auto s = scales.dimensions();
    if (K % g || g % p || s.size() != 3 || s[0] != S || s[1] != K / g || s[2] != N ||
        scales.element_type() != ffi::F16)
      return ffi::Error::InvalidArgument(std::string(name) + ": scales do not match the format and shapes");
  }
  *m = Mat{static_cast<const uint8_t*>(data.untyped_data()),
           static_cast<const _Float16*>(scales.untyped_data()), K, N, kind, bits, group};
  return ffi::Error::Success();
}

ffi::Error MoeTierImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> slots,
                       ffi::Buffer<ffi::F32> weights, ffi::AnyBuffer gate, ffi::AnyBuffer gate_s,
                       ffi::AnyBuffer up, ffi::AnyBuffer up_s, ffi::AnyBuffer down, ffi::AnyBuffer down_s,
                       ffi::Buffer<ffi::F32> gate_b, ffi::Buffer<ffi::F32> up_b, ffi::Buffer<ffi::F32> down_b,
                       ffi::ResultBuffer<ffi::F32> out, int32_t kind, int32_t bits, int32_t group, int32_t act,
                       float alpha, float limit) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || (x.element_type() != ffi::F32 && x.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument("x must be f32 or bf16 [T, H]");
  if (kind < kF32 || kind > kInt || (kind == kInt && bits != 8 && bits != 4 && bits != 2))
    return ffi::Error::InvalidArgument("unknown weight format");
  const int64_t T = xd[0], H = xd[1], P = slots.element_count();
  if (weights.element_count() != P || T == 0 || P % T)
    return ffi::Error::InvalidArgument("slots and weights must be [T * k]");
  if (gate.dimensions().size() != 3) return ffi::Error::InvalidArgument("gate: weights must be [S, K, N]");
  const int64_t k = P / T, S = gate.dimensions()[0], I = gate.dimensions()[2];
  Mat mg, mu, md;
  for (auto err : {check_mat("gate", gate, gate_s, kind, bits, group, S, H, I, &mg),
                   check_mat("up", up, up_s, kind, bits, group, S, H, I, &mu),
                   check_mat("down", down, down_s, kind, bits, group, S, I, H, &md)})
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

  std::vector<float> x_bf16;  // bf16 activations widened once; f32 ones are read in place
  const float* xf = static_cast<const float*>(x.untyped_data());
  if (x.element_type() == ffi::BF16) {
    x_bf16.resize(T * H);
    bf16_to_f32(static_cast<const uint16_t*>(x.untyped_data()), x_bf16.data(), T * H);
    xf = x_bf16.data();
  }
  const float* w = weights.typed_data();
  std::vector<float> y(P * H, 0.0f);  // per-pair outputs, summed per token below in pair order

  parallel_for(pool, static_cast<int>(hit.size()), [&](int item) {
    const int s = hit[item];
    const auto& pairs = pairs_of[s];
    const int R = static_cast<int>(pairs.size());
    std::vector<float> a(R * H), g(R * I, 0.0f), u(R * I, 0.0f), yr(R * H, 0.0f), rows(kRowsPerPass * std::max(H, I));
    for (int r = 0; r < R; ++r) std::memcpy(&a[r * H], &xf[pairs[r] / k * H], H * 4);
    accumulate(mg, s, a.data(), R, g.data(), rows.data());
    accumulate(mu, s, a.data(), R, u.data(), rows.data());
    for (int r = 0; r < R; ++r) {
      const float wr = w[pairs[r]];
      if (!bias && act == 0) {
        for (int64_t i = 0; i < I; ++i) {
          const float gi = g[r * I + i];
          g[r * I + i] = gi / (1.0f + std::exp(-gi)) * u[r * I + i] * wr;  // silu(gate) * up * weight
        }
        continue;
      }
      for (int64_t i = 0; i < I; ++i) {
        float gi = g[r * I + i], ui = u[r * I + i];
        if (bias) gi += gb[s * I + i], ui += ub[s * I + i];
        if (act == 0) {
          g[r * I + i] = gi / (1.0f + std::exp(-gi)) * ui * wr;
        } else {  // clamped SwiGLU: gate clamped above, up on both sides
          gi = std::min(gi, limit);
          ui = std::min(std::max(ui, -limit), limit);
          g[r * I + i] = gi / (1.0f + std::exp(-alpha * gi)) * (ui + 1.0f) * wr;
        }
      }
    }
    accumulate(md, s, g.data(), R, yr.data(), rows.data());
    if (bias)  // weight * (h @ down + bias): the weight is already in h
      for (int r = 0; r < R; ++r) {
        const float wr = w[pairs[r]];
        for (int64_t h = 0; h < H; ++h) yr[r * H + h] += wr * db[s * H + h];
      }
    for (int r = 0; r < R; ++r) std::memcpy(&y[pairs[r] * H], &yr[r * H], H * 4);
  });

  float* o = out->typed_data();
  std::fill(o, o + T * H, 0.0f);
  for (int64_t p = 0; p < P; ++p) {
    if (slot[p] < 0) continue;
    float* ot = o + p / k * H;
    const float* yp = &y[p * H];
    for (int64_t h = 0; h < H; ++h) ot[h] += yp[h];
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
                                  .Arg<ffi::AnyBuffer>()            // up
                                  .Arg<ffi::AnyBuffer>()            // up scales
                                  .Arg<ffi::AnyBuffer>()            // down
                                  .Arg<ffi::AnyBuffer>()            // down scales
                                  .Arg<ffi::Buffer<ffi::F32>>()     // gate bias (or empty)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // up bias (or empty)
                                  .Arg<ffi::Buffer<ffi::F32>>()     // down bias (or empty)
                                  .Ret<ffi::Buffer<ffi::F32>>()     // out
                                  .Attr<int32_t>("kind")
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("group")
                                  .Attr<int32_t>("act")
                                  .Attr<float>("alpha")
                                  .Attr<float>("limit"));
