// 16 bytes of a row element type <-> float, for reductions that accumulate in float32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

}  // namespace jax_ep
