// The communication state behind a cuda-backend EPGroup: one Context per (group, local device),
// created and connected from Python at group creation, found by the FFI handlers by group id
// and device ordinal, freed at close().
#pragma once

#include <nanobind/nanobind.h>

#include <cstdint>
#include <string>

#include "cuda/buffer_map.h"

namespace jax_ep {

struct Context {
  int64_t group_id = 0;
  int device = 0;
  int rank = 0;
  int num_ranks = 0;
  BufferLimits limits{};
  BufferMap buffer_map{};
  unsigned long long timeout_ns = 0;
  char* buffer = nullptr;               // this rank's communication buffer (cudaMalloc)
  ErrorRecord* error_host = nullptr;    // pinned, mapped: written by the device on timeout
  ErrorRecord* error_device = nullptr;
  char* peer_base[kMaxRanks] = {};      // every rank's buffer as mapped here
  bool peer_from_ipc[kMaxRanks] = {};   // opened with cudaIpcOpenMemHandle (closed at destroy)
  bool connected = false;

  CommEnv Env() const;
};

// The connected context of (group_id, device), or null.
Context* FindContext(int64_t group_id, int device);

// The message of the first timeout recorded on this context, or "" if none.
std::string ErrorMessage(const Context& ctx);

void BindGroupState(nanobind::module_& m);

}  // namespace jax_ep
