// The communication buffer of one rank: one cudaMalloc per (group, device), the same map on
// every rank of a group, so a peer finds anything in it by the offsets below. Host and device
// code share this header; ComputeBufferMap is the one place its sizes are derived.
#pragma once

#include <cstddef>
#include <cstdint>

namespace jax_ep {

constexpr int kMaxRanks = 8;          // ranks of one EP group (one host)
constexpr int kRoutingChunk = 256;    // slots per chunk of the routing pass (threads per block)
constexpr int kMaxExperts = 4096;     // the routing pass keeps per-expert counters in shared memory

// Progress of one rank, written by itself and its peers. Flags hold the sequence number of the
// call that set them, so they never need resetting and survive CUDA-graph replay.
struct alignas(128) SignalArea {
  unsigned long long seq;                       // calls made by this rank (its kernels only)
  unsigned long long poisoned;                  // nonzero once a wait timed out: the group is dead
  unsigned int block_counter[4];                // "last block done" counters, one per kernel kind
  unsigned int invalid_slots;                   // ids outside [-1, E) seen by this call's routing
  unsigned long long notify[kMaxRanks];         // peer s: seq of its latest notify / barrier
  unsigned long long data_done[kMaxRanks];      // peer s: seq when its pushes to us are complete
};

// Progress of the padded layout's calls on one rank, written by its own kernels. Two kinds of
// call, each with its own sequence and double-buffered regions: dispatch-kind (source -> expert:
// dispatch and redispatch) and combine-kind (expert -> source).
struct alignas(128) PaddedSignal {
  unsigned long long seq[2];       // completed calls of each kind (advanced by their last kernel)
  unsigned int block_counter[4];   // "last block done" counters of the padded layout's kernels
};

// Limits a group's buffers are sized for (from EPConfig and the mesh).
struct BufferLimits {
  int num_ranks;
  int num_experts;
  int top_k;
  int max_tokens;
  int64_t max_capacity;    // C for max_tokens
  int64_t max_row_bytes;   // hidden_size * itemsize of the widest dtype
  int padded_max_tokens = 0;     // M of the padded layout; 0: no padded-layout buffers
  int padded_scale_cols = 0;     // float32 scales per fp8 row (ceil(hidden_size / 128))
  bool padded_zero_fill = true;  // zero the padded rows past each (expert, source) count
  int padded_segments = 1;       // sources each rank sends for (the hierarchical backend's host
                                 // groups: one per host); the regions' sizes do not depend on it
};

// Byte offsets into the communication buffer. Shared regions (peers write them):
//   signal, counts [kMaxRanks][E] int32 (row s written by rank s),
//   row_primary [C] int32, row_src [C] int32, row_f32 [S] float, slot_f32 [Tk] float,
//   staging [S][row_bytes]
// Private regions (only this rank's kernels): local_rank [Tk], chunk_hist / chunk_base
// [chunks][E], dest_base [E].   (S = max(C, T*k), Tk = T*k.)
//
// Padded-layout regions (only with padded_max_tokens = M > 0; P = E pairs (local expert,
// source), index l * N + s on the expert's rank; N = padded_segments * num_ranks sources, so P is
// E in a host group of the hierarchical backend too), each as two halves [2] used by alternate
// calls:
//   padded_disp_flag [P] u64 (tag << 32 | rows), padded_disp_dups [P] int32,
//   padded_disp_w [P * M] float, padded_disp_scales [P * M][scale cols] float,
//   padded_disp_rows [P * M][row bytes]                                        (source -> expert)
//   padded_comb_flag [kMaxRanks] u64 (seq), padded_comb_scale / padded_comb_value [E * M] float,
//   padded_comb_rows [E * M][row bytes] ([segment][group expert][p])           (expert -> source)
// and, not halved: padded_signal (PaddedSignal), padded_expert_counter [E] u32 (private: one per
// (segment, group expert) a rank sends to).
struct BufferMap {
  size_t signal, counts, row_primary, row_src, row_f32, slot_f32, staging;
  size_t local_rank, chunk_hist, chunk_base, dest_base;
  size_t total_bytes;
  int padded_max_tokens;  // 0: the group has no padded-layout buffers
  size_t padded_signal, padded_expert_counter;
  size_t padded_disp_flag[2], padded_disp_dups[2], padded_disp_w[2], padded_disp_scales[2],
      padded_disp_rows[2];
  size_t padded_comb_flag[2], padded_comb_scale[2], padded_comb_value[2], padded_comb_rows[2];
};

inline size_t AlignUp(size_t x, size_t a) { return (x + a - 1) / a * a; }

inline BufferMap ComputeBufferMap(const BufferLimits& lim) {
  const int64_t slots = static_cast<int64_t>(lim.max_tokens) * lim.top_k;
  const int64_t cap = lim.max_capacity;
  const int64_t s = cap > slots ? cap : slots;
  const int64_t max_chunks = (slots + kRoutingChunk - 1) / kRoutingChunk;
  BufferMap m{};
  size_t off = 0;
  auto take = [&off](size_t bytes) {
    const size_t at = off;
    off = AlignUp(off + bytes, 256);
    return at;
  };
  m.signal = take(sizeof(SignalArea));
  m.counts = take(sizeof(int32_t) * kMaxRanks * lim.num_experts);
  m.row_primary = take(sizeof(int32_t) * cap);
  m.row_src = take(sizeof(int32_t) * cap);
  m.row_f32 = take(sizeof(float) * s);
  m.slot_f32 = take(sizeof(float) * slots);
  m.staging = take(static_cast<size_t>(s) * lim.max_row_bytes);
  m.local_rank = take(sizeof(int32_t) * slots);
  m.chunk_hist = take(sizeof(int32_t) * max_chunks * lim.num_experts);
  m.chunk_base = take(sizeof(int32_t) * max_chunks * lim.num_experts);
  m.dest_base = take(sizeof(int32_t) * lim.num_experts);
  m.padded_max_tokens = lim.padded_max_tokens;
  if (lim.padded_max_tokens > 0) {
    const size_t rows = static_cast<size_t>(lim.num_experts) * lim.padded_max_tokens;  // P * M
    m.padded_signal = take(sizeof(PaddedSignal));
    m.padded_expert_counter = take(sizeof(unsigned int) * lim.num_experts);
    for (int h = 0; h < 2; ++h) {
      m.padded_disp_flag[h] = take(sizeof(unsigned long long) * lim.num_experts);
      m.padded_disp_dups[h] = take(sizeof(int32_t) * lim.num_experts);
      m.padded_disp_w[h] = take(sizeof(float) * rows);
      m.padded_disp_scales[h] = take(sizeof(float) * rows * lim.padded_scale_cols);
      m.padded_disp_rows[h] = take(rows * lim.max_row_bytes);
      m.padded_comb_flag[h] = take(sizeof(unsigned long long) * kMaxRanks);
      m.padded_comb_scale[h] = take(sizeof(float) * rows);
      m.padded_comb_value[h] = take(sizeof(float) * rows);
      m.padded_comb_rows[h] = take(rows * lim.max_row_bytes);
    }
  }
  m.total_bytes = off;
  return m;
}

// What a timed-out wait leaves for the host, in pinned host memory the device writes.
struct ErrorRecord {
  int32_t code;   // 0: none; 1: timeout waiting for a peer
  int32_t phase;  // a Phase below
  int32_t peer;   // the rank that never arrived
  int32_t rank;   // the rank that waited
  unsigned long long seq;
};

enum Phase : int32_t {
  kPhaseDispatchNotify = 1,
  kPhaseDispatchData = 2,
  kPhaseBarrier = 3,
  kPhaseCombineData = 4,
  kPhasePaddedDispatch = 5,
  kPhasePaddedCombine = 6,
};

inline const char* PhaseName(int32_t phase) {
  switch (phase) {
    case kPhaseDispatchNotify: return "dispatch/notify (count exchange)";
    case kPhaseDispatchData: return "dispatch/data (rows from peers)";
    case kPhaseBarrier: return "barrier (peer ready)";
    case kPhaseCombineData: return "combine/data (rows pushed back)";
    case kPhasePaddedDispatch: return "padded dispatch (rows and counts from peers)";
    case kPhasePaddedCombine: return "padded combine (rows pushed back)";
    default: return "unknown";
  }
}

// Everything a kernel needs to reach its own and its peers' buffers, passed by value.
struct CommEnv {
  int rank;
  int num_ranks;
  char* base[kMaxRanks];  // each rank's buffer as mapped in this process (base[rank] is ours)
  BufferMap map;
  ErrorRecord* error;     // device pointer of the host-mapped record
  unsigned long long timeout_ns;
};

}  // namespace jax_ep
