#include "ffi/group_state.h"

#include <cuda_runtime.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <utility>
#include <vector>

#include "cuda/api.h"

namespace nb = nanobind;

namespace jax_ep {
namespace {

std::mutex registry_mutex;
std::map<std::pair<int64_t, int>, std::unique_ptr<Context>> registry;

// No iostreams here: the module may be loaded next to another libstdc++ (the host process's),
// and a locale-dependent stream is where such a mismatch crashes.
void Check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("jax_ep: ") + what + " failed: " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

// Teardown cannot throw (it runs from close() and at interpreter exit): a failure there is
// reported on stderr and the rest of the teardown goes on.
void CheckAtTeardown(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "jax_ep: %s failed at teardown: %s (%s)\n", what, cudaGetErrorName(err),
                 cudaGetErrorString(err));
  }
}

// Runs with `device` current and restores the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    Check(cudaGetDevice(&previous_), "cudaGetDevice");
    Check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { CheckAtTeardown(cudaSetDevice(previous_), "restoring the current device"); }

 private:
  int previous_ = 0;
};

Context& Get(int64_t group_id, int device) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry.find({group_id, device});
  if (it == registry.end()) {
    throw std::runtime_error("jax_ep: no communication state for group " +
                             std::to_string(group_id) + " on device " + std::to_string(device));
  }
  return *it->second;
}

void FreeContext(Context& ctx) {
  DeviceGuard guard(ctx.device);
  // Kernels of this group may still be queued; the buffers must outlive them.
  CheckAtTeardown(cudaDeviceSynchronize(), "waiting for the group's kernels");
  for (int r = 0; r < kMaxRanks; ++r) {
    if (ctx.peer_from_ipc[r] && ctx.peer_base[r]) {
      CheckAtTeardown(cudaIpcCloseMemHandle(ctx.peer_base[r]), "cudaIpcCloseMemHandle");
    }
  }
  if (ctx.buffer) CheckAtTeardown(cudaFree(ctx.buffer), "cudaFree of the EP buffer");
  if (ctx.error_host) CheckAtTeardown(cudaFreeHost(ctx.error_host), "cudaFreeHost");
  ctx.buffer = nullptr;
  ctx.error_host = nullptr;
}

void CreateContext(int64_t group_id, int device, int rank, int num_ranks, int num_experts,
                   int top_k, int max_tokens, int64_t max_capacity, int64_t max_row_bytes,
                   double timeout_s, int padded_max_tokens, int padded_scale_cols,
                   bool padded_zero_fill, int padded_segments) {
  if (num_ranks < 1 || num_ranks > kMaxRanks) {
    throw std::invalid_argument("jax_ep: the cuda backend supports 1 to " +
                                std::to_string(kMaxRanks) + " ranks per group");
  }
  if (num_experts > kMaxExperts) {
    throw std::invalid_argument("jax_ep: the cuda backend supports at most " +
                                std::to_string(kMaxExperts) + " experts");
  }
  // The padded layout's sources: padded_segments per rank, E_local experts each.
  if (padded_segments < 1 || num_experts % (num_ranks * padded_segments)) {
    throw std::invalid_argument("jax_ep: num_experts must be a multiple of the padded layout's "
                                "num_ranks * padded_segments sources");
  }
  auto ctx = std::make_unique<Context>();
  ctx->group_id = group_id;
  ctx->device = device;
  ctx->rank = rank;
  ctx->num_ranks = num_ranks;
  ctx->limits = BufferLimits{num_ranks, num_experts, top_k, max_tokens, max_capacity,
                             max_row_bytes, padded_max_tokens, padded_scale_cols,
                             padded_zero_fill, padded_segments};
  ctx->buffer_map = ComputeBufferMap(ctx->limits);
  ctx->timeout_ns = static_cast<unsigned long long>(timeout_s * 1e9);
  {
    DeviceGuard guard(device);
    int optin = 0;
    Check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
          "cudaDeviceGetAttribute");
    const size_t smem = routing::RoutingSmemBytes(num_experts);
    if (smem > static_cast<size_t>(optin)) {
      throw std::invalid_argument(
          "jax_ep: the routing pass for " + std::to_string(num_experts) + " experts needs " +
          std::to_string(smem) + " bytes of shared memory per block; GPU " +
          std::to_string(device) + " allows " + std::to_string(optin) + ". Use fewer experts");
    }
    Check(routing::PrepareRoutingKernels(), "configuring the routing kernels");
    Check(cudaMalloc(&ctx->buffer, ctx->buffer_map.total_bytes), "cudaMalloc of the EP buffer");
    Check(cudaMemset(ctx->buffer, 0, ctx->buffer_map.total_bytes), "cudaMemset of the EP buffer");
    Check(cudaHostAlloc(reinterpret_cast<void**>(&ctx->error_host), sizeof(ErrorRecord),
                        cudaHostAllocMapped | cudaHostAllocPortable),
          "cudaHostAlloc of the error record");
    *ctx->error_host = ErrorRecord{};
    Check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&ctx->error_device), ctx->error_host,
                                   0),
          "cudaHostGetDevicePointer");
    Check(cudaDeviceSynchronize(), "initialising the EP buffer");
  }
  ctx->peer_base[rank] = ctx->buffer;
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto& slot = registry[{group_id, device}];
  if (slot) throw std::runtime_error("jax_ep: group state created twice on one device");
  slot = std::move(ctx);
}

nb::bytes IpcHandle(int64_t group_id, int device) {
  Context& ctx = Get(group_id, device);
  DeviceGuard guard(device);
  cudaIpcMemHandle_t handle;
  Check(cudaIpcGetMemHandle(&handle, ctx.buffer), "cudaIpcGetMemHandle");
  return nb::bytes(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void ConnectLocalPeer(int64_t group_id, int device, int peer_rank, int peer_device) {
  Context& ctx = Get(group_id, device);
  Context& peer = Get(group_id, peer_device);
  if (peer.rank != peer_rank) throw std::runtime_error("jax_ep: peer rank mismatch");
  if (peer_device != device) {
    DeviceGuard guard(device);
    int can = 0;
    Check(cudaDeviceCanAccessPeer(&can, device, peer_device), "cudaDeviceCanAccessPeer");
    if (!can) {
      throw std::runtime_error("jax_ep: GPU " + std::to_string(device) + " cannot access GPU " +
                               std::to_string(peer_device) +
                               " directly (no peer access / NVLink); the cuda backend needs "
                               "peer access between the GPUs of an EP group");
    }
    const cudaError_t err = cudaDeviceEnablePeerAccess(peer_device, 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled) {
      cudaGetLastError();  // clear the sticky-free "already enabled" status
    } else {
      Check(err, "cudaDeviceEnablePeerAccess");
    }
  }
  ctx.peer_base[peer_rank] = peer.buffer;
}

void ConnectRemotePeer(int64_t group_id, int device, int peer_rank, nb::bytes handle_bytes) {
  Context& ctx = Get(group_id, device);
  if (handle_bytes.size() != sizeof(cudaIpcMemHandle_t)) {
    throw std::invalid_argument("jax_ep: bad IPC handle size");
  }
  cudaIpcMemHandle_t handle;
  std::memcpy(&handle, handle_bytes.c_str(), sizeof(handle));
  DeviceGuard guard(device);
  void* ptr = nullptr;
  Check(cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess),
        "cudaIpcOpenMemHandle (mapping a peer process's EP buffer)");
  ctx.peer_base[peer_rank] = static_cast<char*>(ptr);
  ctx.peer_from_ipc[peer_rank] = true;
}

void FinishConnect(int64_t group_id, int device) {
  Context& ctx = Get(group_id, device);
  for (int r = 0; r < ctx.num_ranks; ++r) {
    if (!ctx.peer_base[r]) {
      throw std::runtime_error("jax_ep: rank " + std::to_string(r) + " was never connected");
    }
  }
  ctx.connected = true;
}

void DestroyGroup(int64_t group_id) {
  std::vector<std::unique_ptr<Context>> doomed;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    for (auto it = registry.begin(); it != registry.end();) {
      if (it->first.first == group_id) {
        doomed.push_back(std::move(it->second));
        it = registry.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& ctx : doomed) FreeContext(*ctx);
}

std::string GroupError(int64_t group_id) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  for (auto& [key, ctx] : registry) {
    if (key.first == group_id) {
      std::string msg = ErrorMessage(*ctx);
      if (!msg.empty()) return msg;
    }
  }
  return "";
}

size_t BufferBytes(int64_t group_id, int device) {
  return Get(group_id, device).buffer_map.total_bytes;
}

// (free, total) bytes of `device` as the driver sees them: what the EP buffers (plain cudaMalloc,
// outside XLA's pool) take and give back shows here.
std::pair<size_t, size_t> DeviceMemory(int device) {
  DeviceGuard guard(device);
  size_t free_bytes = 0, total_bytes = 0;
  Check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  return {free_bytes, total_bytes};
}

}  // namespace

CommEnv Context::Env() const {
  CommEnv env{};
  env.rank = rank;
  env.num_ranks = num_ranks;
  for (int r = 0; r < kMaxRanks; ++r) env.base[r] = peer_base[r];
  env.map = buffer_map;
  env.error = error_device;
  env.timeout_ns = timeout_ns;
  return env;
}

Context* FindContext(int64_t group_id, int device) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry.find({group_id, device});
  if (it == registry.end() || !it->second->connected) return nullptr;
  return it->second.get();
}

std::string ErrorMessage(const Context& ctx) {
  const volatile ErrorRecord* rec = ctx.error_host;
  if (!rec || rec->code == 0) return "";
  char text[512];
  std::snprintf(text, sizeof(text),
                "jax_ep: rank %d timed out after %.1f s waiting for rank %d in %s (call %llu of "
                "EP group %lld); the group is unusable now. Every rank must make the same "
                "sequence of jax_ep calls; a process that died or diverged causes this.",
                static_cast<int>(rec->rank), ctx.timeout_ns / 1e9, static_cast<int>(rec->peer),
                PhaseName(rec->phase), static_cast<unsigned long long>(rec->seq),
                static_cast<long long>(ctx.group_id));
  return text;
}

void BindGroupState(nb::module_& m) {
  m.def("create_context", &CreateContext, nb::arg("group_id"), nb::arg("device"), nb::arg("rank"),
        nb::arg("num_ranks"), nb::arg("num_experts"), nb::arg("top_k"), nb::arg("max_tokens"),
        nb::arg("max_capacity"), nb::arg("max_row_bytes"), nb::arg("timeout_s"),
        nb::arg("padded_max_tokens") = 0, nb::arg("padded_scale_cols") = 0,
        nb::arg("padded_zero_fill") = true, nb::arg("padded_segments") = 1,
        "Allocates one rank's communication buffer on `device` (with the padded-layout "
        "regions when padded_max_tokens > 0; each rank sends padded_segments sources' tokens).");
  m.def("ipc_handle", &IpcHandle, "The CUDA IPC handle of a context's buffer (bytes).");
  m.def("connect_local_peer", &ConnectLocalPeer,
        "Maps a peer rank of this process (peer access between the two GPUs).");
  m.def("connect_remote_peer", &ConnectRemotePeer,
        "Maps a peer rank of another process from its IPC handle.");
  m.def("finish_connect", &FinishConnect, "Marks a context ready once every rank is mapped.");
  m.def("destroy_group", &DestroyGroup, "Frees every context of a group in this process.");
  m.def("group_error", &GroupError, "The first timeout message of a group, or ''.");
  m.def("buffer_bytes", &BufferBytes, "Bytes of one context's communication buffer.");
  m.def("device_memory", &DeviceMemory, nb::arg("device"),
        "(free, total) bytes of a local device (cudaMemGetInfo).");
}

}  // namespace jax_ep
