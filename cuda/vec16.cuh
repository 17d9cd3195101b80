// 16 bytes of a row element type <-> float, for reductions that accumulate in float32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "cuda/api.h"

namespace jax_ep {

template <typename T>
struct Vec16F32;

template <>
struct Vec16F32<float> {
  static constexpr int kN = 4;
  __device__ static void Load(const int4& v, float* x) {
    const float* f = reinterpret_cast<const float*>(&v);
#pragma unroll
    for (int i = 0; i < kN; ++i) x[i] = f[i];
  }
  __device__ static int4 Store(const float* x) {
    int4 v;
    float* f = reinterpret_cast<float*>(&v);
#pragma unroll
    for (int i = 0; i < kN; ++i) f[i] = x[i];
    return v;
  }
};

template <typename Half2, typename Elem>
struct Vec16Pairs {
  static constexpr int kN = 8;
  __device__ static float2 ToF2(const __nv_bfloat162& h) { return __bfloat1622float2(h); }
  __device__ static float2 ToF2(const __half2& h) { return __half22float2(h); }
  __device__ static void FromF2(float a, float b, __nv_bfloat162* h) { *h = __floats2bfloat162_rn(a, b); }
  __device__ static void FromF2(float a, float b, __half2* h) { *h = __floats2half2_rn(a, b); }
  __device__ static void Load(const int4& v, float* x) {
    const Half2* h = reinterpret_cast<const Half2*>(&v);
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) {
      const float2 f = ToF2(h[i]);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
  __device__ static int4 Store(const float* x) {
    int4 v;
    Half2* h = reinterpret_cast<Half2*>(&v);
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) FromF2(x[2 * i], x[2 * i + 1], &h[i]);
    return v;
  }
};

template <>
struct Vec16F32<__nv_bfloat16> : Vec16Pairs<__nv_bfloat162, __nv_bfloat16> {};
template <>
struct Vec16F32<__half> : Vec16Pairs<__half2, __half> {};

// Calls launch(T{}, std::bool_constant<kOutF32>{}) with the row element type T and output kind
// of a reduce: float32 rows give float32 sums already, so only 16-bit rows have a second (f32)
// output kind.
template <typename Launch>
cudaError_t WithReduceTypes(ElemType elem, bool out_f32, Launch launch) {
  switch (elem) {
    case ElemType::kF32: return launch(float{}, std::false_type{});
    case ElemType::kBF16:
      return out_f32 ? launch(__nv_bfloat16{}, std::true_type{})
                     : launch(__nv_bfloat16{}, std::false_type{});
    case ElemType::kF16:
      return out_f32 ? launch(__half{}, std::true_type{}) : launch(__half{}, std::false_type{});
  }
  return cudaErrorInvalidValue;
}

// A reduced vector of kN floats to the output row: in the rows' type (one 16-byte vector), or
// as float32 (kN / 4 vectors), for partial sums that are added again later.
template <typename T, bool kOutF32>
__device__ __forceinline__ void StoreSum(int4* out_row, int v, const float* acc) {
  using V = Vec16F32<T>;
  if constexpr (kOutF32) {
    float4* dst = reinterpret_cast<float4*>(out_row) + v * (V::kN / 4);
#pragma unroll
    for (int q = 0; q < V::kN / 4; ++q) {
      dst[q] = make_float4(acc[4 * q], acc[4 * q + 1], acc[4 * q + 2], acc[4 * q + 3]);
    }
  } else {
    out_row[v] = V::Store(acc);
  }
}

// The reduction step of combine: acc[u] += scales[g] * row g's vector u, for g = 0 .. n - 1 in
// that order (slot order: the fixed float32 summation order that makes combine deterministic).
// Vector u of the lane is element v0 + u * 32 of the row; those at or past v_end are skipped.
template <typename T, int kGroup, int kPerLane>
__device__ __forceinline__ void AccumulateSlots(float (&acc)[kPerLane][Vec16F32<T>::kN],
                                                const int4 (&loaded)[kGroup][kPerLane],
                                                const float (&scales)[kGroup], int n, int v0,
                                                int v_end) {
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (g < n) {
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        if (v0 + u * 32 < v_end) {
          float x[Vec16F32<T>::kN];
          Vec16F32<T>::Load(loaded[g][u], x);
#pragma unroll
          for (int i = 0; i < Vec16F32<T>::kN; ++i) acc[u][i] += scales[g] * x[i];
        }
      }
    }
  }
}

// The gather-reduce of a combine, for one lane's kPerLane vectors (v0 + u * 32, those below
// v_end): acc = the sum, in slot order, of scale_j * row_j over the lanes j set in `slots`, where
// lane j holds slot j's row pointer and scale; kGroup slots' loads are in flight before they
// are added. Rows of the lanes set in `peer_rows` were written by another rank and are read
// through L2 (ld.global.cg).
template <typename T, int kGroup, int kPerLane>
__device__ __forceinline__ void SumSlotRows(float (&acc)[kPerLane][Vec16F32<T>::kN],
                                            unsigned slots, unsigned peer_rows,
                                            const int4* row, float scale, int v0, int v_end) {
#pragma unroll
  for (int u = 0; u < kPerLane; ++u)
#pragma unroll
    for (int i = 0; i < Vec16F32<T>::kN; ++i) acc[u][i] = 0.0f;
  for (unsigned m = slots; m;) {
    int4 loaded[kGroup][kPerLane];
    float scales[kGroup];
    int n = 0;
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (m) {
        const int j = __ffs(m) - 1;
        m &= m - 1;
        const int4* s = reinterpret_cast<const int4*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(row), j));
        scales[g] = __shfl_sync(0xffffffffu, scale, j);
        const bool from_peer = (peer_rows >> j) & 1u;
#pragma unroll
        for (int u = 0; u < kPerLane; ++u) {
          const int v = v0 + u * 32;
          if (v < v_end) loaded[g][u] = from_peer ? __ldcg(s + v) : s[v];
        }
        n = g + 1;
      }
    }
    AccumulateSlots<T, kGroup, kPerLane>(acc, loaded, scales, n, v0, v_end);
  }
}

}  // namespace jax_ep
