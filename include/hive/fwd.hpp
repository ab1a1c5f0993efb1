#pragma once
/// @file
/// Forward declarations of hive's public classes and class templates, each template's default
/// policies stated here once, and the policy bundle (DefaultPolicies, ServerFor, TrainerFor).
///
/// The headers that define these templates include this one and repeat no default. Template
/// parameters are declared as plain `class`: each definition checks its policies with
/// `static_assert(Concept<P>, ...)` in its body, which names the slot that failed.

#include <cstddef>

namespace hive {

class Id160;
class Buffer;
struct Message;
struct Limits;
class Error;
class RemoteError;

namespace net {
class Tcp;
class Simulated;
class SimNetwork;
class Runtime;
struct RpcOptions;
template <class Request, class Response>
struct Method;
}  // namespace net

namespace dht {
template <std::size_t K = 20, std::size_t Alpha = 3, int DepthModulo = 5>
struct Kademlia;
template <class T = net::Tcp, class R = Kademlia<>>
class Node;
}  // namespace dht

template <class T = net::Tcp, class R = dht::Kademlia<>>
class BasicDHT;

namespace moe {
struct AnyExpert;
template <std::size_t MaxBatchSize = 4096>
class PriorityBatcher;
template <class M = AnyExpert>
class ModuleBackend;
template <class T = net::Tcp>
class Client;
}  // namespace moe

namespace averaging {
struct Butterfly;
struct Gloo;
template <class T = net::Tcp, class R = dht::Kademlia<>, class A = Butterfly>
class DecentralizedAverager;
template <class T = net::Tcp, class R = dht::Kademlia<>, class A = Butterfly>
class PowerSGDAverager;
}  // namespace averaging

namespace optim {
template <class T = net::Tcp, class R = dht::Kademlia<>, class A = averaging::Butterfly>
class DecentralizedOptimizer;
template <class T = net::Tcp, class R = dht::Kademlia<>>
class ProgressTracker;
template <class T = net::Tcp, class R = dht::Kademlia<>, class A = averaging::Butterfly>
class CollaborativeOptimizer;
template <class T = net::Tcp, class R = dht::Kademlia<>, class A = averaging::Butterfly>
class DiLoCoOptimizer;
}  // namespace optim

template <class T = net::Tcp, class R = dht::Kademlia<>, class S = moe::PriorityBatcher<>, class B = moe::ModuleBackend<>>
class Server;

namespace serve {
template <class M>
class Publisher;
template <class M, class T = net::Tcp, class R = dht::Kademlia<>, class S = moe::PriorityBatcher<>>
class InferenceServer;
template <class M, class T = net::Tcp, class R = dht::Kademlia<>, class S = moe::PriorityBatcher<>>
class Replica;
template <class T = net::Tcp, class R = dht::Kademlia<>>
class InferenceClient;
}  // namespace serve

template <class T = net::Tcp, class R = dht::Kademlia<>, class A = averaging::Butterfly>
class Trainer;

/// The policy bundle hive uses when none is named. Derive from it and replace one member to
/// change one slot:
/// @code
/// struct MyPolicies : hive::DefaultPolicies { using backend = hive::moe::ModuleBackend<GatedMLP>; };
/// hive::ServerFor<MyPolicies> server(backends, options);
/// @endcode
struct DefaultPolicies {
  /// net::Transport: how peers connect.
  using transport = net::Tcp;
  /// dht::Routing: the DHT's routing.
  using routing = dht::Kademlia<>;
  /// moe::Scheduler: how a server batches requests onto its compute threads.
  using scheduler = moe::PriorityBatcher<>;
  /// moe::Backend: the computation behind each expert.
  using backend = moe::ModuleBackend<>;
  /// averaging::Strategy: the all-reduce of averaging rounds.
  using strategy = averaging::Butterfly;
};

/// The DHT peer of policy bundle P.
template <class P = DefaultPolicies>
using DHTFor = BasicDHT<typename P::transport, typename P::routing>;
/// The expert server of policy bundle P.
template <class P = DefaultPolicies>
using ServerFor = Server<typename P::transport, typename P::routing, typename P::scheduler, typename P::backend>;
/// The training peer of policy bundle P.
template <class P = DefaultPolicies>
using TrainerFor = Trainer<typename P::transport, typename P::routing, typename P::strategy>;
/// The averager of policy bundle P.
template <class P = DefaultPolicies>
using AveragerFor = averaging::DecentralizedAverager<typename P::transport, typename P::routing, typename P::strategy>;
/// The collaborative (target-batch-size) optimizer of policy bundle P.
template <class P = DefaultPolicies>
using CollaborativeOptimizerFor = optim::CollaborativeOptimizer<typename P::transport, typename P::routing, typename P::strategy>;
/// The DiLoCo optimizer of policy bundle P.
template <class P = DefaultPolicies>
using DiLoCoOptimizerFor = optim::DiLoCoOptimizer<typename P::transport, typename P::routing, typename P::strategy>;
/// The inference server of policy bundle P, serving a model of module type M.
template <class M, class P = DefaultPolicies>
using InferenceServerFor = serve::InferenceServer<M, typename P::transport, typename P::routing, typename P::scheduler>;
/// The inference replica of policy bundle P.
template <class M, class P = DefaultPolicies>
using ReplicaFor = serve::Replica<M, typename P::transport, typename P::routing, typename P::scheduler>;
/// The inference client of policy bundle P.
template <class P = DefaultPolicies>
using InferenceClientFor = serve::InferenceClient<typename P::transport, typename P::routing>;

}  // namespace hive
