#pragma once
/// @file
/// RemoteExpert: an expert on another machine used like a local torch module, with autograd
/// (the backward pass sends grad_outputs to the server and gets the input gradients back).

#include <hive/fwd.hpp>
#include <hive/core/tensor_codec.hpp>
#include <hive/dht/experts.hpp>
#include <hive/moe/protocol.hpp>
#include <hive/net/rpc.hpp>
#include <hive/net/runtime.hpp>

#include <torch/autograd.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include <algorithm>
#include <exception>
#include <functional>
#include <future>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace hive::moe {

/// Run-time knobs of a RemoteExpert.
struct RemoteExpertOptions {
  /// Longest a forward call may take (including time queued on the server).
  HIVE_ARG(Seconds, forward_timeout, Seconds(30));
  /// Longest a backward call may take.
  HIVE_ARG(Seconds, backward_timeout, Seconds(60));
  /// Compression of the tensors sent, and asked of the server for its replies.
  HIVE_ARG(Compression, compression, Compression::none);
  HIVE_OPTIONS_JSON(RemoteExpertOptions, forward_timeout, backward_timeout, compression)
};

/// How remote experts reach their servers: a call by address and method. Implemented by
/// Client<T>; a test may supply its own (which must run every callback before it is destroyed).
class ExpertClient {
 public:
  /// Receives the reply, or the failure (hive::Error, hive::RemoteError) as an exception.
  using Callback = std::function<void(std::exception_ptr, Message)>;

  virtual ~ExpertClient() = default;

  /// Sends `request` to `method` at `address`; `done` runs once, on one of the client's io
  /// threads (keep it short), with the reply or the failure. What implementations provide;
  /// callers use async_call or call.
  virtual void start_call(const std::string& address, std::string_view method, Message request, Seconds timeout,
                          Callback done) = 0;

  /// Sends `request` to `method` at `address` and completes `token` (a callback
  /// `void(std::exception_ptr, Message)`, asio::use_future, asio::use_awaitable, deferred) with
  /// the reply or the failure (hive::Error, hive::RemoteError).
  template <class Token>
  auto async_call(const std::string& address, std::string_view method, Message request, Seconds timeout, Token&& token) {
    return asio::async_initiate<Token, void(std::exception_ptr, Message)>(
        [this, address, method = std::string(method), timeout](auto handler, Message request) {
          // The reply arrives on the client's io thread; the handler runs on its own executor
          // (a coroutine's, for use_awaitable), or there when it has none.
          auto shared = std::make_shared<std::decay_t<decltype(handler)>>(std::move(handler));
          start_call(address, method, std::move(request), timeout, [shared](std::exception_ptr error, Message reply) {
            auto ex = asio::get_associated_executor(*shared);
            asio::dispatch(ex, [shared, error, reply = std::move(reply)]() mutable { std::move(*shared)(error, std::move(reply)); });
          });
        },
        token, std::move(request));
  }

  /// Sends `request` to `method` at `address` and waits; throws hive::Error / RemoteError.
  Message call(const std::string& address, std::string_view method, Message request, Seconds timeout) {
    return async_call(address, method, std::move(request), timeout, asio::use_future).get();
  }

  /// The most rows one request to the server at `address` may carry (the `max_batch_size` of
  /// its moe.info), or nullopt while unknown. With `wait` false this never blocks: the first
  /// query for an address asks the server in the background (naming expert `uid`) and later
  /// queries see the answer. With `wait` true an unknown limit is asked for now (nullopt when
  /// the server does not answer within `timeout`). Known limits are kept for the client's life.
  std::optional<std::int64_t> max_batch_size(const std::string& address, const std::string& uid, Seconds timeout,
                                             bool wait = false) {
    {
      std::lock_guard lock(limits_mutex_);
      auto [it, added] = limits_.try_emplace(address);
      if (it->second || (!added && !wait)) return it->second;  // known, or already being asked
    }
    Message m;
    m.header = {{"uid", uid}};
    auto learn = [this, address](std::exception_ptr error, const Message& reply) -> std::optional<std::int64_t> {
      std::optional<std::int64_t> limit;
      if (!error && reply.header.is_object() && reply.header.contains("max_batch_size") &&
          reply.header["max_batch_size"].is_number_unsigned() && reply.header["max_batch_size"].get<std::uint64_t>() >= 1)
        limit = static_cast<std::int64_t>(std::min<std::uint64_t>(reply.header["max_batch_size"].get<std::uint64_t>(),
                                                                  std::numeric_limits<std::int64_t>::max()));
      std::lock_guard lock(limits_mutex_);
      if (limit) limits_[address] = limit;
      else limits_.erase(address);  // ask again next time
      return limit;
    };
    if (!wait) {
      start_call(address, info_method, std::move(m), timeout,
                 [learn](std::exception_ptr error, Message reply) { learn(error, reply); });
      return std::nullopt;
    }
    auto reply = async_call(address, info_method, std::move(m), timeout, asio::use_future);
    try {
      return learn(nullptr, reply.get());
    } catch (...) {
      return learn(std::current_exception(), {});
    }
  }

 private:
  std::mutex limits_mutex_;
  std::map<std::string, std::optional<std::int64_t>> limits_;  // address -> max_batch_size
};

/// An ExpertClient over transport T with its own io runtime (connections are kept open and
/// shared by every expert that uses this client).
///
/// @tparam T the net::Transport policy
template <class T>
class Client final : public ExpertClient {
  static_assert(net::Transport<T>, "T must model net::Transport (see docs/concepts/transport.md)");

 public:
  /// Starts `threads` io threads and an RPC peer that only calls out.
  explicit Client(typename T::Options transport_options = typename T::Options{}, net::RpcOptions rpc_options = {},
                  int threads = 1)
      : runtime_(threads), rpc_(net::Rpc<T>::create(runtime_.executor(), std::move(transport_options), std::move(rpc_options))) {}
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  /// Fails calls in flight with a shutdown error and joins the io threads.
  ~Client() override {
    rpc_->close();
    rpc_.reset();
    runtime_.stop();
  }

  /// Sends `request` to `method` at `address`; `done` runs on this client's io thread.
  void start_call(const std::string& address, std::string_view method, Message request, Seconds timeout,
                  Callback done) override {
    rpc_->async_call(address, std::string(method), std::move(request), timeout,
                     [done = std::move(done)](std::exception_ptr error, Message reply) { done(error, std::move(reply)); });
  }
  /// The RPC peer.
  [[nodiscard]] const std::shared_ptr<net::Rpc<T>>& rpc() const noexcept { return rpc_; }

 private:
  net::Runtime runtime_;
  std::shared_ptr<net::Rpc<T>> rpc_;
};

/// The process-wide client of transport T that remote experts use unless given another (its
/// transport's default options: a transport that cannot make a peer from them, such as
/// net::Simulated, which needs its network, throws hive::InvalidArgument; pass a Client<T>).
template <class T = net::Tcp>
std::shared_ptr<ExpertClient> default_client() {
  static const std::shared_ptr<ExpertClient> client = std::make_shared<Client<T>>();
  return client;
}

namespace detail {

/// The request of a forward or backward call to expert `uid`: its tensors, compressed with
/// `compression`, which the server is asked to use for its reply too.
inline Message expert_request(const std::string& uid, const std::vector<at::Tensor>& tensors, Compression compression) {
  Message m;
  m.header = {{"uid", uid}};
  if (compression != Compression::none) m.header["compression"] = compression;
  add_tensors(m, tensors, compression);
  return m;
}

/// What a remote call needs, shared by a RemoteExpert, its clones and the autograd nodes of
/// its calls (which may outlive the module).
struct ExpertCall : torch::CustomClassHolder {
  std::string uid;
  std::string address;
  std::shared_ptr<ExpertClient> client;
  RemoteExpertOptions options;
  std::mutex mutex;
  std::optional<nlohmann::json> info;

  [[nodiscard]] Message request(const std::vector<at::Tensor>& tensors) const {
    return expert_request(uid, tensors, options.compression());
  }

  // One call, or, when the server refuses that many rows, one call per max_batch_size rows (in
  // parallel), their outputs joined along the batch dimension. A split backward is one update
  // per part on the server.
  std::vector<at::Tensor> call(std::string_view method, const std::vector<at::Tensor>& tensors, Seconds timeout) {
    const auto rows = tensors.empty() || tensors.front().dim() == 0 ? 0 : tensors.front().size(0);
    auto limit = client->max_batch_size(address, uid, timeout);
    if (!limit || rows <= *limit) {
      try {
        return get_tensors(client->call(address, method, request(tensors), timeout));
      } catch (const Error& e) {
        if (e.code() != errc::limit_exceeded) throw;
        limit = client->max_batch_size(address, uid, timeout, /*wait=*/true);
        if (!limit || rows <= *limit) throw;
      }
    }
    std::vector<std::future<Message>> parts;
    for (std::int64_t offset = 0; offset < rows; offset += *limit) {
      std::vector<at::Tensor> slice;
      slice.reserve(tensors.size());
      for (const auto& t : tensors) slice.push_back(t.narrow(0, offset, std::min(*limit, rows - offset)));
      parts.push_back(client->async_call(address, method, request(slice), timeout, asio::use_future));
    }
    std::vector<std::vector<at::Tensor>> outputs;
    outputs.reserve(parts.size());
    for (auto& p : parts) outputs.push_back(get_tensors(p.get()));
    std::vector<at::Tensor> joined;
    for (std::size_t i = 0; i < outputs.front().size(); ++i) {
      std::vector<at::Tensor> pieces;
      for (const auto& o : outputs) {
        if (o.size() != outputs.front().size())
          throw Error(errc::bad_tensor, fmt::format("expert {} returned {} and {} tensors for two parts of a batch", uid,
                                                    outputs.front().size(), o.size()));
        pieces.push_back(o[i]);
      }
      joined.push_back(at::cat(pieces, 0));
    }
    return joined;
  }

  std::vector<at::Tensor> forward(const std::vector<at::Tensor>& inputs) {
    return call(forward_method, inputs, options.forward_timeout());
  }

  std::vector<at::Tensor> backward(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& grad_outputs) {
    std::vector<at::Tensor> both(inputs);
    both.insert(both.end(), grad_outputs.begin(), grad_outputs.end());
    auto grads = call(backward_method, both, options.backward_timeout());
    if (grads.size() != inputs.size())
      throw Error(errc::bad_tensor, fmt::format("expert {} returned {} gradients for {} inputs", uid, grads.size(), inputs.size()));
    return grads;
  }

  const nlohmann::json& fetch_info() {
    std::lock_guard lock(mutex);
    if (!info) {
      Message m;
      m.header = {{"uid", uid}};
      info = client->call(address, info_method, std::move(m), options.forward_timeout()).header;
    }
    return *info;
  }
};

/// The autograd function of one remote call: forward sends the inputs, backward sends the
/// saved inputs and the output gradients and returns the input gradients.
struct RemoteCall : torch::autograd::Function<RemoteCall> {
  /// `dummy` is an empty tensor that requires grad: with it the call is part of the graph even
  /// when no input requires grad (data fed straight to an expert), so that the backward pass
  /// still reaches the server and trains the expert.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& dummy,
                                                c10::intrusive_ptr<ExpertCall> call, at::TensorList inputs) {
    (void)dummy;
    std::vector<at::Tensor> in(inputs.begin(), inputs.end());
    auto outputs = call->forward(in);
    ctx->saved_data["call"] = c10::IValue::make_capsule(c10::intrusive_ptr<torch::CustomClassHolder>(std::move(call)));
    ctx->save_for_backward(in);
    std::vector<at::Tensor> constant;
    for (const auto& o : outputs)
      if (!at::isFloatingType(o.scalar_type())) constant.push_back(o);
    if (!constant.empty()) ctx->mark_non_differentiable(constant);
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto call = c10::static_intrusive_pointer_cast<ExpertCall>(ctx->saved_data["call"].toCapsule());
    auto inputs = ctx->get_saved_variables();
    std::vector<at::Tensor> detached;
    for (const auto& x : inputs) detached.push_back(x.detach());
    for (auto& g : grad_outputs) g = g.detach();
    auto grads = call->backward(detached, grad_outputs);
    torch::autograd::variable_list out;
    out.reserve(inputs.size() + 2);
    out.emplace_back();  // dummy
    out.emplace_back();  // `call` is not a tensor
    for (std::size_t i = 0; i < inputs.size(); ++i)
      out.push_back(at::isFloatingType(inputs[i].scalar_type()) ? grads[i] : at::Tensor());
    return out;
  }
};

}  // namespace detail

/// An expert served elsewhere, used like a local module: `expert(x)` runs the forward on the
/// server; a backward pass through the result runs the expert's backward there (which also
/// trains it) and returns the gradient of `x`.
///
/// @par Example
/// @code
/// hive::moe::RemoteExpert expert("expert.0", "127.0.0.1:1337");
/// auto y = expert(torch::randn({3, 512}, torch::requires_grad()));
/// y.sum().backward();
/// @endcode
/// @par Thread safety
/// Calls from several threads at once are fine; each blocks its thread until its reply.
class RemoteExpertImpl : public torch::nn::Cloneable<RemoteExpertImpl> {
 public:
  /// Expert `uid` served at `address`, reached through `client` (default_client() when null).
  RemoteExpertImpl(std::string uid, std::string address, std::shared_ptr<ExpertClient> client = nullptr,
                   RemoteExpertOptions options = {}) {
    HIVE_CHECK(!uid.empty() && !address.empty(), "a remote expert needs a uid and an address");
    call_ = c10::make_intrusive<detail::ExpertCall>();
    call_->uid = std::move(uid);
    call_->address = std::move(address);
    call_->client = client ? std::move(client) : default_client();
    call_->options = std::move(options);
  }
  /// Nothing to reset: the parameters live on the server.
  void reset() override {}

  /// One input, one output: the common case (ffn, transformer, nop). `expert(x)` calls this.
  at::Tensor forward(const at::Tensor& x) {
    auto outputs = call({x});
    HIVE_CHECK(outputs.size() == 1, "expert {} returns {} tensors; use call() for several", uid(), outputs.size());
    return outputs.front();
  }
  /// Any number of inputs and outputs (det_dropout takes {x, mask}); `forward` is the
  /// one-tensor form (a module holder's call operator needs a single, non-overloaded forward).
  std::vector<at::Tensor> call(std::vector<at::Tensor> inputs) {
    return detail::RemoteCall::apply(at::empty({0}).requires_grad_(), call_, at::TensorList(inputs));
  }

  /// The expert's info from its server (schemas, parameters, updates), fetched on first use.
  const nlohmann::json& info() { return call_->fetch_info(); }
  /// The expert's uid.
  [[nodiscard]] const std::string& uid() const noexcept { return call_->uid; }
  /// The server's address.
  [[nodiscard]] const std::string& address() const noexcept { return call_->address; }
  /// The options.
  [[nodiscard]] const RemoteExpertOptions& options() const noexcept { return call_->options; }

  /// Prints RemoteExpert(uid=…, address=…).
  void pretty_print(std::ostream& stream) const override {
    stream << "hive::moe::RemoteExpert(uid=" << uid() << ", address=" << address() << ")";
  }

 private:
  c10::intrusive_ptr<detail::ExpertCall> call_;
};
/// An expert served elsewhere (module holder); RemoteExpert(nullptr) is empty.
TORCH_MODULE(RemoteExpert);

/// Looks `uids` up in the DHT and returns a RemoteExpert for each, or an empty one (testing
/// false) for a uid that no server announces, reached through `client` (default_client<T>() when
/// null; over net::Simulated pass a Client<T> on the same network).
template <net::Transport T, dht::Routing R>
std::vector<RemoteExpert> get_experts(BasicDHT<T, R>& dht, const std::vector<std::string>& uids,
                                      std::shared_ptr<ExpertClient> client = nullptr, const RemoteExpertOptions& options = {}) {
  if (!client) client = default_client<T>();
  auto addresses = dht::get_experts(dht, uids);
  std::vector<RemoteExpert> out;
  out.reserve(uids.size());
  for (std::size_t i = 0; i < uids.size(); ++i)
    out.push_back(addresses[i] ? RemoteExpert(uids[i], *addresses[i], client, options) : RemoteExpert(nullptr));
  return out;
}

}  // namespace hive::moe
