#pragma once
/// @file
/// averaging::Gloo: the all-reduce Strategy that runs libtorch's c10d::ProcessGroupGloo over
/// the group matchmaking formed, rebuilt for every round, for trusted clusters.
///
/// Needs libtorch's Gloo backend (Debian: libtorch-dev links libgloo; the headers come from
/// libgloo-dev). Link the `hive::gloo` CMake target, which defines USE_C10D_GLOO; this header is
/// not part of <hive/hive.hpp>.

#ifndef USE_C10D_GLOO
#error "hive/averaging/gloo.hpp needs libtorch's Gloo backend: link hive::gloo (install libgloo-dev)"
#endif

#include <hive/averaging/butterfly.hpp>
#include <hive/averaging/group.hpp>
#include <hive/core/clock.hpp>
#include <hive/core/error.hpp>
#include <hive/detail/event.hpp>
#include <hive/net/rpc.hpp>
#include <hive/net/transport.hpp>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <atomic>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace hive::averaging {

/// All-reduce by Gloo (the second averaging::Strategy model, beside Butterfly).
///
/// For each round the group's leader (member 0) opens a c10d::TCPStore on a free port and tells
/// the members its port when they ask (over part_method, so the averager's wire methods do not
/// change); every member then builds a c10d::ProcessGroupGloo of the group's size with its
/// index as rank, bound to the host of its own address, and runs one SUM all-reduce of
/// `[flat * weight, weight]`. Every member ends with the same bytes.
///
/// When to pick it: a trusted cluster whose members all accept connections from each other
/// (Gloo connects every pair). It has no client mode (a group with a client-mode member fails
/// at once), no per-sender timeout (a member that dies or stalls fails the round after
/// `AllReduceSettings::timeout`, on every member), no limits on what peers send, and the store
/// listens on every interface. Butterfly is the choice for volunteers on the internet.
/// Compression: none (float32) or float16 (summed in float16); other codecs are refused.
///
/// Gloo blocks, so each round's Gloo work runs on a thread of its own; the Rpc's strand only
/// waits for it. Destroying a Runner joins the threads of rounds still running (each ends by
/// the round's timeout).
struct Gloo {
  /// The strategy's name (in logs).
  static constexpr std::string_view name = "gloo";

  /// One peer's side of Gloo rounds: the stores it leads, the port requests it answers.
  /// run(), serve() and close() run on the Rpc's strand.
  template <net::Transport T>
  class Runner : public std::enable_shared_from_this<Runner<T>> {
   public:
    /// A runner that asks leaders for their store's port through `rpc`.
    explicit Runner(std::shared_ptr<net::Rpc<T>> rpc) : rpc_(std::move(rpc)) {}
    Runner(const Runner&) = delete;
    Runner& operator=(const Runner&) = delete;
    /// Waits for the Gloo threads of rounds still running.
    ~Runner() {
      std::vector<Thread> threads;
      {
        std::lock_guard lock(threads_mutex_);
        threads.swap(threads_);
      }
      for (auto& t : threads) t.thread.join();
    }

    /// The group's weighted average of `flat` (float32, one dimension). Throws hive::Error
    /// (errc::round_failed, errc::timeout, errc::invalid_argument) when the round fails; the
    /// caller then keeps its tensors.
    asio::awaitable<Reduced> run(const GroupInfo& group, at::Tensor flat, double weight, const AllReduceSettings& s) {
      HIVE_CHECK(std::isfinite(weight) && weight >= 0 && weight <= s.max_weight,
                 "averaging weight must be a finite number in [0, max_weight = {}], got {}", s.max_weight, weight);
      HIVE_CHECK(group.my_index < group.size(), "member index {} outside a group of {}", group.my_index, group.size());
      // Gloo sums in place on every rank: there is no reducer to aggregate robustly, nor to check
      // what members send.
      HIVE_CHECK(s.aggregation.method() == Aggregation::mean,
                 "the Gloo strategy averages with the plain mean only; aggregation '{}' needs the butterfly strategy",
                 to_string(s.aggregation.method()));
      HIVE_CHECK(s.compression == Compression::none || s.compression == Compression::float16,
                 "the Gloo strategy sends float32 or float16; compression '{}' is not supported", to_string(s.compression));
      for (std::size_t i = 0; i < group.size(); ++i)
        HIVE_CHECK(!group.members[i].client_mode && !group.members[i].address.empty(),
                   "the Gloo strategy needs every member to accept connections; member {} is in client mode", i);
      if (closed_) throw Error(errc::shutdown, "the averager is shutting down");
      const auto deadline = deadline_after(s.timeout);
      const auto leader = net::HostPort::parse(group.members[0].address);
      const auto me = net::HostPort::parse(group.members[group.my_index].address);

      // The leader's store, or how the others reach it (connecting blocks briefly, so it runs
      // with the Gloo work).
      c10::intrusive_ptr<c10d::Store> store;
      c10d::TCPStoreOptions client;
      if (group.my_index == 0) {
        store = open_store(group.group_id, me.host, s);
      } else {
        Message ask;
        ask.header = {{"group", group.group_id}, {"store", true}};
        auto op = rpc_->co_call(group.members[0].address, s.method, std::move(ask), remaining(deadline));
        auto reply = co_await std::move(op);
        const auto& h = reply.header;
        if (!h.is_object() || !h.contains("port") || !h["port"].is_number_unsigned() || h["port"].template get<std::uint64_t>() == 0 ||
            h["port"].template get<std::uint64_t>() > 65535)
          throw Error(errc::bad_header, "the leader's store reply lacks a valid 'port'");
        client.port = h["port"].template get<std::uint16_t>();
        client.isServer = false;
        client.timeout = std::chrono::duration_cast<std::chrono::milliseconds>(remaining(deadline));
      }

      struct Shared {
        std::mutex mutex;
        at::Tensor result;
        std::string error;
        detail::Event done;  // set on the strand
      };
      auto shared = std::make_shared<Shared>();
      auto input = flat.contiguous().to(at::kFloat).mul(weight);
      auto packed = at::cat({input, at::full({1}, weight, at::kFloat)});
      if (s.compression == Compression::float16) packed = packed.to(at::kHalf);
      const auto rank = static_cast<int>(group.my_index);
      const auto size = static_cast<int>(group.size());
      const auto gloo_timeout = std::chrono::duration_cast<std::chrono::milliseconds>(remaining(deadline));
      auto executor = rpc_->get_executor();
      auto finished_flag = std::make_shared<std::atomic<bool>>(false);
      auto work = [shared, store, client, leader_host = leader.host, my_host = me.host,
                   prefix = group.group_id, rank, size, gloo_timeout, packed, executor, finished_flag]() mutable {
        try {
          auto base = store ? store : c10::intrusive_ptr<c10d::Store>(c10::make_intrusive<c10d::TCPStore>(leader_host, client));
          auto prefixed = c10::make_intrusive<c10d::PrefixStore>(prefix, base);
          auto options = c10d::ProcessGroupGloo::Options::create(gloo_timeout);
          options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(my_host));
          c10d::ProcessGroupGloo pg(prefixed, rank, size, options);
          std::vector<at::Tensor> tensors{packed};
          pg.allreduce(tensors)->wait(gloo_timeout);
          std::lock_guard lock(shared->mutex);
          shared->result = tensors[0].to(at::kFloat);
        } catch (const std::exception& e) {
          std::lock_guard lock(shared->mutex);
          shared->error = first_line(e.what());
        }
        finished_flag->store(true);
        asio::post(executor, [shared] { shared->done.set(); });
      };
      {
        std::lock_guard lock(threads_mutex_);
        std::erase_if(threads_, [](Thread& t) {
          if (!t.finished->load()) return false;
          t.thread.join();
          return true;
        });
        threads_.push_back({std::thread(std::move(work)), std::move(finished_flag)});
      }
      const bool finished = co_await shared->done.wait(deadline + std::chrono::seconds(1));
      if (group.my_index == 0) forget_store(group.group_id);
      if (!finished)
        throw Error(errc::timeout, fmt::format("Gloo all-reduce did not finish within {:.1f} s", s.timeout.count()));
      std::lock_guard lock(shared->mutex);
      if (!shared->error.empty()) throw Error(errc::round_failed, fmt::format("Gloo all-reduce: {}", shared->error));
      const auto n = shared->result.numel() - 1;
      const double total = shared->result[n].template item<double>();
      if (!(total > 0)) throw Error(errc::round_failed, "every member gave weight 0");
      co_return Reduced{shared->result.slice(0, 0, n).div(total), {}, {}};
    }

    /// Serves part_method for Gloo rounds: answers a member's {"group", "store": true} with
    /// {"port"} of the store this peer leads for that round, once it is open. The caller's id
    /// is not checked: Gloo's own connections are not authenticated (docs/security.md).
    asio::awaitable<Message> serve(net::CallContext, Message m, const AllReduceSettings& s) {
      const auto& h = m.header;
      if (!h.is_object() || !h.contains("group") || !h["group"].is_string() || !h.contains("store") ||
          !h["store"].is_boolean())
        throw Error(errc::bad_header, "a Gloo round's avg.part needs 'group' (string) and 'store' (true)");
      const auto id = h["group"].get<std::string>();
      const auto wait_until = deadline_after(s.registration_timeout);
      for (;;) {
        if (closed_) throw Error(errc::shutdown, "the averager is shutting down");
        if (auto it = stores_.find(id); it != stores_.end()) {
          Message reply;
          reply.header = {{"port", it->second->getPort()}};
          co_return reply;
        }
        if (SteadyClock::now() >= wait_until)
          throw Error(errc::invalid_argument, fmt::format("no Gloo round '{}' led here", id));
        co_await registered_.wait(wait_until);
      }
    }

    /// Refuses later rounds and port requests. Rounds whose Gloo work already runs end by
    /// their timeout.
    void close() {
      closed_ = true;
      stores_.clear();
      registered_.notify_all();
    }

   private:
    static Seconds remaining(Deadline deadline) {
      return std::max(std::chrono::duration_cast<Seconds>(deadline - SteadyClock::now()), Seconds(0.001));
    }
    static std::string first_line(std::string_view what) {
      const auto end = what.find('\n');
      return std::string(what.substr(0, end));
    }

    // The server listens on every interface; `host` is where this peer's own client reaches it.
    c10::intrusive_ptr<c10d::Store> open_store(const std::string& id, const std::string& host, const AllReduceSettings& s) {
      c10d::TCPStoreOptions o;
      o.port = 0;  // a free port, told to members that ask
      o.isServer = true;
      o.waitWorkers = false;
      o.timeout = std::chrono::duration_cast<std::chrono::milliseconds>(s.timeout);
      c10::intrusive_ptr<c10d::TCPStore> store;
      try {
        store = c10::make_intrusive<c10d::TCPStore>(host, o);
      } catch (const std::exception& e) {
        throw Error(errc::round_failed, fmt::format("cannot open the round's Gloo store: {}", first_line(e.what())));
      }
      stores_[id] = store;
      registered_.notify_all();
      return store;
    }
    void forget_store(const std::string& id) { stores_.erase(id); }

    std::shared_ptr<net::Rpc<T>> rpc_;
    std::map<std::string, c10::intrusive_ptr<c10d::TCPStore>> stores_;
    detail::Notifier registered_;
    struct Thread {
      std::thread thread;
      std::shared_ptr<std::atomic<bool>> finished;
    };
    std::mutex threads_mutex_;  // the destructor may run on another thread than the strand
    std::vector<Thread> threads_;
    bool closed_ = false;
  };
};

static_assert(Strategy<Gloo>);

}  // namespace hive::averaging
