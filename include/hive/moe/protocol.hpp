#pragma once
/// @file
/// The remote-experts wire protocol's method names, shared by hive::Server and the clients
/// (RemoteExpert, the mixture) so that neither includes the other. docs/protocol.md describes
/// each method's request and reply.

#include <string_view>

namespace hive::moe {

/// Method that returns an expert's info: its backend's info() (schemas, parameter count,
/// updates) and the server's `max_batch_size`, the most rows one request may carry.
inline constexpr std::string_view info_method = "moe.info";
/// Method that runs an expert's forward on a batch.
inline constexpr std::string_view forward_method = "moe.forward";
/// Method that runs an expert's backward (and update) on a batch.
inline constexpr std::string_view backward_method = "moe.backward";

}  // namespace hive::moe
