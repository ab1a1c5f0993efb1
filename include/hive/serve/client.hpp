#pragma once
/// @file
/// serve::InferenceClient: finds a run's inference endpoints in the DHT and asks them for
/// predictions, either the least loaded one with failover (ClientMode::one) or every one with a
/// majority vote (ClientMode::all).

#include <hive/fwd.hpp>
#include <hive/core/log.hpp>
#include <hive/core/message.hpp>
#include <hive/core/tensor_codec.hpp>
#include <hive/detail/event.hpp>
#include <hive/dht/dht.hpp>
#include <hive/serve/server.hpp>

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace hive::serve {

/// How a client spreads a request.
enum class ClientMode {
  /// The least loaded endpoint; on an error or a timeout the next one (max_attempts in all).
  one,
  /// Every endpoint at once; per row the majority's class wins, ties go to the higher summed
  /// confidence (the outputs must be class scores).
  all,
};

/// "one" or "all".
inline void to_json(nlohmann::json& j, ClientMode m) { j = m == ClientMode::all ? "all" : "one"; }
/// Reads "one" or "all"; throws hive::InvalidArgument otherwise.
inline void from_json(const nlohmann::json& j, ClientMode& m) {
  const auto s = j.get<std::string>();
  HIVE_CHECK(s == "one" || s == "all", "a client mode is \"one\" or \"all\", got \"{}\"", s);
  m = s == "all" ? ClientMode::all : ClientMode::one;
}

/// An endpoint as declared in the DHT.
struct Endpoint {
  /// Where it answers.
  std::string address;
  /// The step of the snapshot it serves.
  std::uint64_t step = 0;
  /// Requests in flight when it declared itself.
  double load = 0;
  /// "snapshot" or "live".
  std::string mode;
  /// "trainer" or "replica".
  std::string role;
};

/// One endpoint's answer (or failure) to one request.
struct Answer {
  /// The endpoint.
  std::string address;
  /// Empty on success, else what went wrong.
  std::string error;
  /// The step of the snapshot the answer was computed from.
  std::uint64_t step = 0;
  /// The snapshot's checksum (16 hex digits; zeros for live weights).
  std::string checksum;
  /// "snapshot" or "live".
  std::string mode;
  /// True when live weights changed while the answer was computed.
  bool torn = false;
  /// Round-trip time of this call.
  Seconds latency{0};
  /// The outputs (undefined on failure).
  at::Tensor outputs;
  /// True when the call succeeded.
  [[nodiscard]] bool ok() const noexcept { return error.empty(); }
};

/// A client's result for one batch.
struct Prediction {
  /// Mode one: the answering endpoint's outputs. Mode all: the mean of the answers' softmax.
  at::Tensor outputs;
  /// The predicted class per row (argmax, or the vote's winner); undefined unless the outputs
  /// are [rows, classes].
  at::Tensor labels;
  /// The winning class's probability per row (mean over the voters that chose it).
  at::Tensor confidence;
  /// Every call made, in order, failed ones included.
  std::vector<Answer> answers;
  /// From the call to the result.
  Seconds latency{0};
  /// The steps of the snapshots the successful answers came from.
  [[nodiscard]] std::vector<std::uint64_t> steps() const {
    std::vector<std::uint64_t> out;
    for (const auto& a : answers)
      if (a.ok()) out.push_back(a.step);
    return out;
  }
  /// The endpoints that answered.
  [[nodiscard]] std::vector<std::string> answered_by() const {
    std::vector<std::string> out;
    for (const auto& a : answers)
      if (a.ok()) out.push_back(a.address);
    return out;
  }
};

/// Run-time knobs of an InferenceClient.
struct ClientOptions {
  /// The run's name (endpoints under `prefix.serve`); required unless `endpoints` is given.
  HIVE_ARG(std::string, prefix, "");
  /// one (least loaded, failover) or all (every endpoint, majority vote).
  HIVE_ARG(ClientMode, mode, ClientMode::one);
  /// Fixed endpoints ("host:port"): no DHT lookup.
  HIVE_ARG(std::vector<std::string>, endpoints, {});
  /// Only endpoints declared with this role ("trainer", "replica"); empty: any.
  HIVE_ARG(std::string, role, "");
  /// Timeout of each call.
  HIVE_ARG(Seconds, timeout, Seconds(5));
  /// Mode one: endpoints tried per request, at most.
  HIVE_ARG(std::size_t, max_attempts, 3);
  /// How long the endpoint list read from the DHT is used before it is read again.
  HIVE_ARG(Seconds, refresh_period, Seconds(5));
  /// An endpoint that failed is tried last for this long.
  HIVE_ARG(Seconds, ban_time, Seconds(10));
  /// Compression of the inputs sent, and asked for the outputs.
  HIVE_ARG(Compression, compression, Compression::none);
  HIVE_OPTIONS_JSON(ClientOptions, prefix, mode, endpoints, role, timeout, max_attempts, refresh_period, ban_time,
                    compression)
};

/// Asks a run's inference endpoints (training peers, replicas) for predictions.
///
/// Mode one sends each request to the endpoint with the lowest load (its declared load plus
/// this client's calls in flight to it) and, when that call fails or times out, to the next,
/// up to max_attempts; a failed endpoint is tried last for ban_time. Mode all sends it to every
/// endpoint and votes. Every Prediction lists the calls made, their latencies and the snapshot
/// steps the answers came from.
///
/// @tparam T the net::Transport policy
/// @tparam R the dht::Routing policy
/// @par Example
/// @code
/// hive::DHT dht(hive::DHTOptions().initial_peers({"127.0.0.1:1337"}).client_mode(true));
/// hive::serve::InferenceClient<> client(dht, hive::serve::ClientOptions().prefix("my_run"));
/// auto p = client.predict(x);   // p.labels, p.answers[0].step, p.latency
/// @endcode
/// @par Thread safety
/// predict() and async_predict() from any thread but the DHT peer's own; many at once. The DHT
/// peer must outlive the client.
template <class T, class R>
class InferenceClient {
  static_assert(net::Transport<T>, "T must model net::Transport (see docs/concepts/transport.md)");
  static_assert(dht::Routing<R>, "R must model dht::Routing (see docs/concepts/routing.md)");

 public:
  /// The DHT peer type.
  using dht_type = BasicDHT<T, R>;

  /// A client calling through `dht`'s peer.
  InferenceClient(dht_type& dht, ClientOptions options) : state_(std::make_shared<State>(dht, std::move(options))) {
    const auto& o = state_->options;
    HIVE_CHECK(!o.prefix().empty() || !o.endpoints().empty(), "ClientOptions needs a prefix or fixed endpoints");
    HIVE_CHECK(o.timeout() > Seconds(0), "timeout must be positive");
    HIVE_CHECK(o.max_attempts() >= 1, "max_attempts must be at least 1");
  }

  /// Predicts `x` (a batch matching the endpoints' input schema); throws hive::Error when no
  /// endpoint answered: errc::connection_refused when none is known, errc::remote_error with
  /// the last failure's message otherwise.
  Prediction predict(at::Tensor x) { return async_predict(std::move(x), asio::use_future).get(); }

  /// predict() with a completion token for `void(std::exception_ptr, Prediction)`.
  template <class Token = asio::use_future_t<>>
  auto async_predict(at::Tensor x, Token&& token = {}) {
    auto state = state_;
    return asio::co_spawn(
        state->rpc->get_executor(),
        [state, x = std::move(x)]() -> asio::awaitable<Prediction> {
          auto op = state->predict(x);
          co_return co_await std::move(op);
        },
        std::forward<Token>(token));
  }

  /// The endpoints known now (reads the DHT when the list is older than refresh_period).
  std::vector<Endpoint> endpoints() {
    auto state = state_;
    return asio::co_spawn(
               state->rpc->get_executor(),
               [state]() -> asio::awaitable<std::vector<Endpoint>> { co_return co_await state->candidates(); },
               asio::use_future)
        .get();
  }

  /// The options.
  [[nodiscard]] const ClientOptions& options() const noexcept { return state_->options; }

 private:
  using rpc_type = typename dht_type::node_type::rpc_type;

  // Everything here lives on the RPC strand.
  struct State : std::enable_shared_from_this<State> {
    State(dht_type& d, ClientOptions o) : dht(d), options(std::move(o)), rpc(d.node()->rpc()) {}

    dht_type& dht;
    ClientOptions options;
    std::shared_ptr<rpc_type> rpc;
    std::vector<Endpoint> known;
    SteadyClock::time_point refreshed{};
    bool refreshing = false;
    std::map<std::string, int> in_flight;
    std::map<std::string, SteadyClock::time_point> banned_until;

    asio::awaitable<void> refresh() {
      if (!options.endpoints().empty()) {
        if (known.empty())
          for (const auto& a : options.endpoints()) known.push_back(Endpoint{a, 0, 0, "", ""});
        co_return;
      }
      if (refreshing && !known.empty()) co_return;
      refreshing = true;
      try {
        auto op = dht.node()->get(Id160::of(endpoints_key(options.prefix())), true);
        auto record = co_await std::move(op);
        std::vector<Endpoint> found;
        if (record)
          if (auto decoded = dht_type::decode(*record))
            for (const auto& [subkey, v] : decoded->dictionary) {
              const auto* address = std::get_if<std::string>(&subkey);
              if (!address || !v.value.is_object()) continue;
              Endpoint e;
              e.address = *address;
              // Another peer's announcement: a malformed one names no usable endpoint. (A NaN
              // load would break the ordering endpoints are chosen in.)
              try {
                e.step = integer_field<std::uint64_t>(v.value, "step", "serve endpoint", 0);
                e.load = v.value.value("load", 0.0);
                e.mode = v.value.value("mode", std::string());
                e.role = v.value.value("role", std::string());
              } catch (const nlohmann::json::exception&) {
                continue;
              } catch (const Error&) {
                continue;
              }
              if (!std::isfinite(e.load)) continue;
              if (!options.role().empty() && e.role != options.role()) continue;
              found.push_back(std::move(e));
            }
        known = std::move(found);
        refreshed = SteadyClock::now();
      } catch (...) {
        refreshing = false;
        throw;
      }
      refreshing = false;
    }

    // Known endpoints, best first: not banned, then lowest load.
    asio::awaitable<std::vector<Endpoint>> candidates() {
      if (known.empty() || SteadyClock::now() - refreshed > options.refresh_period()) co_await refresh();
      const auto now = SteadyClock::now();
      auto list = known;
      auto score = [&](const Endpoint& e) {
        auto it = in_flight.find(e.address);
        return e.load + (it == in_flight.end() ? 0 : it->second);
      };
      auto is_banned = [&](const Endpoint& e) {
        auto it = banned_until.find(e.address);
        return it != banned_until.end() && it->second > now;
      };
      std::stable_sort(list.begin(), list.end(), [&](const Endpoint& a, const Endpoint& b) {
        const bool ba = is_banned(a), bb = is_banned(b);
        if (ba != bb) return bb;
        return score(a) < score(b);
      });
      co_return list;
    }

    asio::awaitable<Answer> call(std::string address, at::Tensor x) {
      Answer a;
      a.address = address;
      Message request;
      if (options.compression() != Compression::none) request.header = {{"compression", options.compression()}};
      add_tensors(request, {x}, options.compression());
      ++in_flight[address];
      const auto start = SteadyClock::now();
      try {
        auto op = rpc->co_call(address, std::string(predict_method), std::move(request), options.timeout());
        Message reply = co_await std::move(op);
        auto tensors = get_tensors(reply, rpc->transport().limits());
        const auto& h = reply.header;
        if (tensors.size() != 1 || !h.is_object()) throw Error(errc::bad_header, "serve.predict reply needs one tensor and a header");
        if (tensors[0].dim() < 1 || tensors[0].size(0) != x.size(0))
          throw Error(errc::bad_tensor, fmt::format("serve.predict answered {} rows for {}", tensors[0].dim() < 1 ? 0 : tensors[0].size(0), x.size(0)));
        a.outputs = tensors[0];
        a.step = integer_field<std::uint64_t>(h, "step", "serve.predict reply", 0);
        a.checksum = h.value("checksum", std::string());
        a.mode = h.value("mode", std::string());
        a.torn = h.value("torn", false);
      } catch (const RemoteError& e) {
        a.error = e.what();  // the endpoint is alive and said why: no ban
      } catch (const std::exception& e) {
        a.error = e.what();
        if (a.error.empty()) a.error = "unknown error";
        banned_until[address] = SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(options.ban_time());
      }
      a.latency = std::chrono::duration_cast<Seconds>(SteadyClock::now() - start);
      if (--in_flight[address] <= 0) in_flight.erase(address);
      co_return a;
    }

    asio::awaitable<Prediction> predict(at::Tensor x) {
      HIVE_CHECK(x.defined() && x.dim() >= 1, "predict() needs a batch: a tensor with a leading batch dimension");
      const auto start = SteadyClock::now();
      auto list = co_await candidates();
      if (list.empty())
        throw Error(errc::connection_refused,
                    fmt::format("no inference endpoint is declared under '{}'", endpoints_key(options.prefix())));
      Prediction p;
      if (options.mode() == ClientMode::one) {
        const auto attempts = std::min(options.max_attempts(), list.size());
        for (std::size_t i = 0; i < attempts; ++i) {
          auto op = call(list[i].address, x);
          auto a = co_await std::move(op);
          const bool ok = a.ok();
          p.answers.push_back(std::move(a));
          if (ok) break;
        }
        const auto& last = p.answers.back();
        if (!last.ok()) throw Error(errc::remote_error, fmt::format("no endpoint answered ({} tried; last: {}: {})",
                                                                    p.answers.size(), last.address, last.error));
        p.outputs = last.outputs;
        if (p.outputs.dim() == 2) {
          auto [conf, labels] = at::softmax(p.outputs.to(at::kFloat), 1).max(1);
          p.labels = labels;
          p.confidence = conf;
        }
      } else {
        auto op = call_all(list, x);
        p.answers = co_await std::move(op);
        vote(p);
      }
      p.latency = std::chrono::duration_cast<Seconds>(SteadyClock::now() - start);
      co_return p;
    }

    asio::awaitable<std::vector<Answer>> call_all(const std::vector<Endpoint>& list, const at::Tensor& x) {
      struct Gather {
        std::vector<Answer> answers;
        std::size_t pending = 0;
        hive::detail::Event done;
      };
      auto gather = std::make_shared<Gather>();
      gather->answers.resize(list.size());
      gather->pending = list.size();
      for (std::size_t i = 0; i < list.size(); ++i) {
        gather->answers[i].address = list[i].address;
        gather->answers[i].error = "no answer before the deadline";
      }
      for (std::size_t i = 0; i < list.size(); ++i) {
        auto work = [self = this->shared_from_this(), address = list[i].address, x]() -> asio::awaitable<Answer> {
          auto op = self->call(address, x);
          co_return co_await std::move(op);
        };
        asio::co_spawn(rpc->get_executor(), std::move(work), [gather, i](std::exception_ptr error, Answer a) {
          if (error) a.error = "the call failed";
          gather->answers[i] = std::move(a);
          if (--gather->pending == 0) gather->done.set();
        });
      }
      // Each call ends by its own timeout; the margin only guards against a lost completion.
      co_await gather->done.wait(deadline_after(options.timeout() + Seconds(5)));
      co_return gather->answers;
    }

    // Majority vote over the answers' argmax per row; ties to the higher summed confidence.
    static void vote(Prediction& p) {
      std::vector<at::Tensor> probs;
      for (const auto& a : p.answers)
        if (a.ok()) {
          HIVE_CHECK(a.outputs.dim() == 2, "mode all votes over class scores [rows, classes]; {} answered rank {}",
                     a.address, a.outputs.dim());
          probs.push_back(at::softmax(a.outputs.to(at::kFloat), 1));
        }
      if (probs.empty()) {
        std::string why = p.answers.empty() ? "no endpoint" : p.answers.back().address + ": " + p.answers.back().error;
        throw Error(errc::remote_error, fmt::format("no endpoint answered ({} called; {})", p.answers.size(), why));
      }
      const auto classes = probs.front().size(1);
      at::Tensor votes = at::zeros_like(probs.front()), confidence = at::zeros_like(probs.front());
      for (const auto& pr : probs) {
        HIVE_CHECK(pr.size(1) == classes, "the endpoints answered different numbers of classes");
        auto [conf, label] = pr.max(1);
        auto one_hot = at::zeros_like(pr).scatter_(1, label.unsqueeze(1), 1.0);
        votes += one_hot;
        confidence += one_hot * conf.unsqueeze(1);
      }
      // Votes dominate: the summed confidence of one class is below the number of voters + 1.
      const auto score = votes * static_cast<double>(probs.size() + 1) + confidence;
      p.labels = score.argmax(1);
      p.confidence = confidence.gather(1, p.labels.unsqueeze(1)).squeeze(1) / votes.gather(1, p.labels.unsqueeze(1)).squeeze(1);
      p.outputs = at::stack(probs).mean(0);
    }
  };

  std::shared_ptr<State> state_;
};

}  // namespace hive::serve
