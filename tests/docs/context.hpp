#pragma once
/// @file
/// What the snippets of README.md and docs/ use without declaring: the reader's model, data,
/// optimizer and peers, as the surrounding prose describes them. Declarations only: the
/// generated sources are compiled, never linked or run (tests/docs/extract_snippets.cpp).

#include <hive/averaging/gloo.hpp>
#include <hive/hive.hpp>
#include <hive/serve/client.hpp>
#include <hive/serve/replica.hpp>

#include <torch/torch.h>

#include <atomic>
#include <latch>
#include <string>
#include <utility>
#include <vector>

/// The names a snippet may use as if the text around it had declared them.
namespace hive_docs {
using namespace std::chrono_literals;

/// Inputs, targets and intermediate activations.
extern at::Tensor x, y, h, mask, labels;
/// The reader's model and its layers.
extern torch::nn::Linear model, proj_out, first_layer, head;
/// The reader's local optimizer.
extern torch::optim::SGD sgd;
/// (inputs, targets) pairs.
extern std::vector<std::pair<at::Tensor, at::Tensor>> batches;
/// A DHT peer that joined the swarm.
extern hive::DHT dht;
/// Options of a Trainer and of a Server.
extern hive::TrainerOptions options;
/// Options of a Server.
extern hive::ServerOptions server_options;

/// The user's own expert module of docs/moe.md.
struct GatedMLPImpl : torch::nn::Module {
  /// Width `hidden`.
  explicit GatedMLPImpl(std::int64_t hidden);
  /// [batch, hidden] → [batch, hidden].
  at::Tensor forward(const at::Tensor& x);
};
TORCH_MODULE(GatedMLP);
/// Backends of GatedMLP experts.
extern std::vector<hive::moe::ModuleBackend<GatedMLP>> backends;

/// An expert class registered by name in docs/moe.md.
struct MyExpertImpl : torch::nn::Module {
  /// Width `hidden`.
  explicit MyExpertImpl(std::int64_t hidden);
  /// [batch, hidden] → [batch, hidden].
  at::Tensor forward(const at::Tensor& x);
};
TORCH_MODULE(MyExpert);

/// A loss of the mixture's output.
at::Tensor task_loss(const at::Tensor& y);

/// docs/averaging.md's averagers: one of an old peer, one of a newcomer.
extern hive::averaging::DecentralizedAverager<> averager, newcomer;
/// The newcomer's tensors; the old peer's epoch and batch count.
extern std::vector<at::Tensor> mine;
extern std::atomic<int> epoch;
extern double batches_seen;

/// examples/averaging_quickstart.cpp: which peer this is, its steps, the join addresses, each
/// peer's data and the latch both peers pass when done.
extern int peer, steps;
extern std::vector<std::string> join;
/// One peer's data.
struct Shard {
  /// Inputs and targets.
  at::Tensor x, y;
};
extern std::vector<Shard> shards;
extern std::latch done_training;

/// docs/net.md's two RPC peers and the server's address.
extern std::shared_ptr<hive::net::Rpc<hive::net::Tcp>> server, client;
extern std::string address;

/// docs/serve.md and README.md: the Fashion-MNIST classifier that trains ([n, 784] → [n, 10]),
/// the function that builds its architecture (examples/common/models.hpp), the training peer
/// and the publisher of its snapshots.
extern torch::nn::Sequential classifier;
torch::nn::Sequential fashion_model();
extern hive::Trainer<> trainer;
extern hive::serve::Publisher<torch::nn::Sequential> publisher;
}  // namespace hive_docs

/// Put in each snippet's namespace after `using namespace hive_docs`: OpenDHT declares a global
/// `namespace dht`, which a name brought in only by that directive would be ambiguous with.
#define HIVE_DOCS_NAMES using hive_docs::dht;
