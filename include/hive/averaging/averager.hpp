#pragma once
/// @file
/// DecentralizedAverager: peers meet in small groups through the DHT and average their tensors
/// with an all-reduce Strategy; a peer may also share its state with newcomers.
///
/// Over 400 lines because matchmaking's leader and follower sides and the round are one state
/// machine on the DHT peer's strand (a peer is both at once, and merges its followers into the
/// group it joins). The all-reduce is the Strategy's (butterfly.hpp, gloo.hpp), the group
/// arithmetic is in group.hpp, state sharing in state.hpp.

#include <hive/fwd.hpp>
#include <hive/averaging/butterfly.hpp>
#include <hive/averaging/group.hpp>
#include <hive/averaging/robust.hpp>
#include <hive/averaging/state.hpp>
#include <hive/core/log.hpp>
#include <hive/dht/dht.hpp>

#include <algorithm>
#include <atomic>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace hive::averaging {

/// Method a peer calls on a group leader to join its group (a long call: the reply comes when
/// the group forms or the leader gives up). Served as `avg.join:<prefix>` (method_for).
inline constexpr std::string_view join_method = "avg.join";
/// How far apart the clocks of two peers may be for matchmaking to work: two machines each
/// up to 3 s off (hivemind's bound) disagree by up to 6 s. Announcements outlive their
/// deadlines by this much, and a leader whose deadline seems up to this much past is asked.
inline constexpr double max_clock_offset = 6.0;

/// Run-time knobs of a DecentralizedAverager.
struct AveragerOptions {
  /// Name of the run: only peers with the same prefix (and tensor shapes) average together.
  HIVE_ARG(std::string, prefix, "");
  /// A leader starts the round as soon as its group has this many members.
  HIVE_ARG(std::size_t, target_group_size, 16);
  /// A leader whose matchmaking time ran out starts the round with at least this many
  /// members (itself included); with fewer, the step fails and nothing changes.
  HIVE_ARG(std::size_t, min_group_size, 2);
  /// Initial group bits ('0'/'1' string): peers meet under `prefix.0b<bits>`; after each round
  /// the bits take the peer's index in its group, so consecutive rounds mix different peers.
  HIVE_ARG(std::string, initial_group_bits, "");
  /// How long one step looks for a group before it gives up (or, as a leader, starts the
  /// round with the members it has).
  HIVE_ARG(Seconds, matchmaking_time, Seconds(5));
  /// Extra time a join request may take beyond the leader's matchmaking deadline, and how long
  /// a chunk waits for its round to be known here.
  HIVE_ARG(Seconds, request_timeout, Seconds(3));
  /// Bound on one all-reduce.
  HIVE_ARG(Seconds, allreduce_timeout, Seconds(60));
  /// How long a reducer waits for a missing member's chunk after the chunk's first arrival;
  /// then it averages the members that sent it.
  HIVE_ARG(Seconds, sender_timeout, Seconds(10));
  /// How long a member waits for a reducer's answer to one chunk (hivemind: 2 × sender_timeout);
  /// then that chunk keeps the member's own values and StepResult::unaveraged says so.
  HIVE_ARG(Seconds, reducer_timeout, Seconds(20));
  /// Compression of the chunks sent and of the averages sent back.
  HIVE_ARG(Compression, compression, Compression::none);
  /// Largest chunk of a part, in bytes of float32 (2^19 = 128Ki elements).
  HIVE_ARG(std::int64_t, part_size_bytes, std::int64_t{1} << 19);
  /// Send tensors and receive averages, but average no part (for peers that cannot accept
  /// connections; implied by a client-mode DHT).
  HIVE_ARG(bool, client_mode, false);
  /// Average a part for the others but send nothing (a peer that holds no model and lends its
  /// bandwidth: its tensors only give the shapes, and are never read or written). Its weight
  /// is 0 whatever step() is given. Not with client_mode.
  HIVE_ARG(bool, auxiliary, false);
  /// This peer's bandwidth as announced to its group (any unit the run agrees on, e.g. Mbit/s);
  /// when every reducing member announced one, each reduces a share of the vector in
  /// proportion. 0: unknown (equal parts).
  HIVE_ARG(double, bandwidth, 0.0);
  /// How often a peer that shares its state re-announces it in the DHT.
  HIVE_ARG(Seconds, declare_state_period, Seconds(10));
  /// Largest reply of a state download, in bytes (each reply carries at least one tensor).
  HIVE_ARG(std::int64_t, state_part_bytes, std::int64_t{8} << 20);
  /// How the part this peer reduces is aggregated: the weighted mean (default), CenteredClip
  /// or a coordinate-wise trimmed mean (robust to members that send arbitrary values). Use the
  /// same on every peer of a run. Butterfly only: the Gloo strategy fails a round that asks
  /// for another method.
  HIVE_ARG(AggregationOptions, aggregation, AggregationOptions());
  /// Largest weight a member may claim (> 0, finite). This peer's step() throws
  /// hive::InvalidArgument above it; a member whose chunk claims a weight that is not a finite
  /// number in [0, max_weight] is dropped from the round and banned. Use the same on every
  /// peer of a run, near the largest weight an honest peer gives (e.g. its batch size).
  HIVE_ARG(double, max_weight, 1e6);
  /// How long a member that sent a chunk failing validation (wrong dtype, shape or size,
  /// non-finite values, a weight out of bounds) is banned from groups with this peer (≥ 0;
  /// 0: dropped from that round only).
  HIVE_ARG(Seconds, ban_duration, Seconds(300));
  /// FOR TESTING ATTACKS ONLY (not in JSON): a function applied to every chunk this peer sends
  /// to another member, whose result goes on the wire instead; tests use it to play a
  /// Byzantine peer (scaled, random, NaN or misshapen parts). Empty (honest) by default.
  HIVE_ARG(PartTamper, tamper_outgoing_for_testing, PartTamper());
  HIVE_OPTIONS_JSON(AveragerOptions, prefix, target_group_size, min_group_size, initial_group_bits, matchmaking_time,
                    request_timeout, allreduce_timeout, sender_timeout, reducer_timeout, compression, part_size_bytes,
                    client_mode, auxiliary, bandwidth, declare_state_period, state_part_bytes, aggregation, max_weight,
                    ban_duration)
};

/// What a step did.
struct StepResult {
  /// True when the tensors now hold the group's average, except the ranges in `unaveraged`.
  bool ok = false;
  /// Element ranges of the flattened tensors (in order, float32 elements) that kept this
  /// peer's values because their reducer failed mid-round; empty when everything was averaged.
  std::vector<Range> unaveraged;
  /// Members of the group (0 when none formed).
  std::size_t group_size = 0;
  /// The round's id (empty when no group formed).
  std::string group_id;
  /// What each member attached to the round, in the group's order.
  std::vector<nlohmann::json> gathered;
  /// Members this peer dropped from the round (a chunk or answer that failed validation, or a
  /// member banned here); the parts they reduce are in `unaveraged`.
  std::vector<DroppedMember> dropped;
  /// Why the step did not average, when it did not.
  std::string error;
  /// The same as a code: errc::shutdown (the averager is stopping), errc::invalid_argument
  /// (another step is running), errc::timeout (no group formed in matchmaking_time, or the
  /// all-reduce ran out of time), errc::round_failed (another member failed the round), or
  /// what the all-reduce threw. Empty when ok.
  std::error_code code;
  /// Seconds spent looking for a group, then averaging.
  double matchmaking_s = 0, allreduce_s = 0;
  /// ok.
  explicit operator bool() const noexcept { return ok; }
  /// True when every element was averaged (ok, and nothing in `unaveraged`).
  [[nodiscard]] bool complete() const noexcept { return ok && unaveraged.empty(); }
};

/// What the body of a custom round (DecentralizedAverager::step_with) gets: the group that
/// matchmaking formed, and all-reduces to run in it.
struct RoundContext {
  /// The group (members, this peer's index, the round's id).
  GroupInfo group;
  /// The weight this peer was given (0 for an auxiliary peer).
  double weight = 1;
  /// Averages `flat` (float32, one dimension, the same size on every member) in the group with
  /// `weight`; `phase` names this all-reduce on the wire, the same on every member and
  /// different for each all-reduce of the round. Throws as the Strategy's run().
  std::function<asio::awaitable<Reduced>(at::Tensor flat, double weight, std::string phase)> allreduce;
};

/// Averages a list of tensors with peers of the same run, found through the DHT.
///
/// step() looks for a group (matchmaking) and averages with it:
/// - Peers announce themselves under the group key `prefix.0b<bits>` with their matchmaking
///   deadline. Every looking peer accepts followers, and asks the peers that rank before it
///   (earlier deadline, then address) to take it — together with the followers it already
///   has, so that groups formed around different peers merge. The best-ranked peer reached
///   leads: it starts the round when it has target_group_size members, or when its
///   matchmaking time ends with at least min_group_size. When matchmaking ends a peer
///   overwrites its announcement with "not looking".
/// - The group then runs the Strategy's all-reduce (butterfly by default). A member that dies
///   or stalls as a sender is left out after sender_timeout; the parts it was to reduce keep
///   each member's own values (StepResult::unaveraged names them). Every element ends either
///   averaged or as it was, never half-written.
///
/// A peer that shares its state (set_state_provider) announces itself under `prefix.all_averagers`
/// with a priority; load_state_from_peers() downloads the state of the peer with the highest.
///
/// @tparam T the net::Transport policy of the DHT it runs on
/// @tparam R the dht::Routing policy
/// @tparam A the all-reduce Strategy
/// @par Example
/// @code
/// hive::DHT dht(hive::DHTOptions().initial_peers({"127.0.0.1:1337"}));
/// std::vector<at::Tensor> tensors{at::randn({16, 16})};
/// hive::averaging::DecentralizedAverager<> averager(dht, tensors,
///     hive::averaging::AveragerOptions().prefix("my_run").target_group_size(4));
/// if (auto r = averager.step(); r) fmt::print("averaged with {} peers\n", r.group_size);
/// @endcode
/// @par Thread safety
/// step(), load_state_from_peers() and the accessors may be called from any thread except the
/// DHT's io threads; one step at a time. Several averagers may share a DHT peer when their
/// prefixes differ (a gradient and a state averager, say); a second one with the same prefix
/// throws hive::InvalidArgument while the first runs. The averaged tensors are written in place under
/// tensors_mutex(): hold it while reading or changing them from other threads.
template <class T, class R, class A>
class DecentralizedAverager {
  static_assert(net::Transport<T>, "T must model net::Transport (see docs/concepts/transport.md)");
  static_assert(dht::Routing<R>, "R must model dht::Routing (see docs/concepts/routing.md)");
  static_assert(Strategy<A>, "A must model averaging::Strategy (see docs/concepts/strategy.md)");
  static_assert(StrategyFor<A, T>, "A's Runner<T> must model averaging::StrategyFor<A, T>");
 public:
  /// The DHT peer type it runs on.
  using dht_type = BasicDHT<T, R>;
  /// A function returning the state to share (called on the DHT's io thread).
  using StateProvider = typename StateSharing<T, R>::Provider;

  /// An averager of `tensors` (shared, written in place) on `dht`, which must outlive it.
  /// Throws hive::InvalidArgument for bad options.
  DecentralizedAverager(dht_type& dht, std::vector<at::Tensor> tensors, AveragerOptions options)
      : core_(std::make_shared<Core>(dht, std::move(tensors), std::move(options))) {
    core_->start();
  }
  DecentralizedAverager(const DecentralizedAverager&) = delete;
  DecentralizedAverager& operator=(const DecentralizedAverager&) = delete;
  /// Stops; see shutdown().
  ~DecentralizedAverager() { shutdown(); }

  /// Looks for a group for up to matchmaking_time and averages the tensors with it, each
  /// member weighted by `weight`. `gather` is any small JSON shown to the other members (in
  /// StepResult::gathered). Never throws for a failed round: the result says why.
  StepResult step(double weight = 1.0, nlohmann::json gather = nullptr) {
    return async_step(weight, std::move(gather), asio::use_future).get();
  }

  /// step() without blocking. `token` is any Asio completion token for the signature
  /// `void(std::exception_ptr, StepResult)`: `asio::use_future` (the default),
  /// `asio::use_awaitable`, `asio::experimental::deferred`, or a callback. A failed round is a StepResult
  /// with `code` set, not an exception.
  template <class Token = asio::use_future_t<>>
  auto async_step(double weight = 1.0, nlohmann::json gather = nullptr, Token&& token = {}) {
    check_weight(weight);
    auto core = core_;
    auto op = [core, weight, gather = std::move(gather)]() -> asio::awaitable<StepResult> {
      co_return co_await core->round(weight, gather, nullptr);
    };
    return asio::co_spawn(core_->rpc->get_executor(), std::move(op), std::forward<Token>(token));
  }

  /// A custom round: looks for a group as step() does, then runs `body`, which averages what
  /// it wants with RoundContext::allreduce (several all-reduces in one group, as PowerSGD's two
  /// phases) and writes the tensors itself (under tensors_mutex()). The body runs on the DHT's
  /// io strand; a body that throws fails the step (StepResult::error), and should leave its
  /// tensors as they were.
  StepResult step_with(std::function<asio::awaitable<void>(RoundContext&)> body, double weight = 1.0,
                       nlohmann::json gather = nullptr) {
    HIVE_CHECK(body, "step_with needs a body");
    check_weight(weight);
    auto core = core_;
    auto op = [core, weight, gather = std::move(gather), body = std::move(body)]() -> asio::awaitable<StepResult> {
      co_return co_await core->round(weight, gather, body);
    };
    return asio::co_spawn(core_->rpc->get_executor(), std::move(op), asio::use_future).get();
  }

  /// The averaged tensors (the same storage as given).
  [[nodiscard]] const std::vector<at::Tensor>& tensors() const noexcept { return core_->tensors; }
  /// Held while the averager reads or writes the tensors.
  [[nodiscard]] std::mutex& tensors_mutex() noexcept { return core_->tensors_mutex; }
  /// The options.
  [[nodiscard]] const AveragerOptions& options() const noexcept { return core_->options; }
  /// The key this peer looks for groups under now.
  [[nodiscard]] std::string group_key() const {
    std::string key;
    detail::run_blocking_on(core_->rpc->get_executor(), [&] { key = core_->keys.group_key(); });
    return key;
  }
  /// True when this peer sends but averages no part.
  [[nodiscard]] bool client_mode() const noexcept { return core_->client_mode; }

  /// Shares this peer's state: `provider` is called (on an io thread) when a peer downloads it.
  /// The peer is announced in the DHT under `prefix.all_averagers` with `priority`.
  void set_state_provider(StateProvider provider, double priority = 0) {
    HIVE_CHECK(!core_->client_mode, "a client-mode peer cannot share its state: nobody can connect to it");
    core_->state->set_provider(std::move(provider), priority);
  }
  /// Changes the priority announced with the shared state (higher is preferred by newcomers);
  /// a changed priority is announced at once, in the background.
  void set_state_priority(double priority) { core_->state->set_priority(priority); }

  /// Downloads the state of the sharing peer with the highest priority (trying the next one
  /// when a download fails); nullopt when no peer shares a state or every download failed.
  std::optional<State> load_state_from_peers(Seconds timeout = Seconds(60)) {
    return async_load_state_from_peers(timeout, asio::use_future).get();
  }
  /// load_state_from_peers() without blocking; `token` as async_step's, for the signature
  /// `void(std::exception_ptr, std::optional<State>)`.
  template <class Token = asio::use_future_t<>>
  auto async_load_state_from_peers(Seconds timeout = Seconds(60), Token&& token = {}) {
    return core_->state->async_download(timeout, std::forward<Token>(token));
  }
  /// Only peers with the same `tag` meet from the next step on (e.g. the epoch whose gradients
  /// are averaged, so that a late peer never mixes two epochs); empty: no tag. Any thread but
  /// the DHT's io threads.
  void set_round_tag(std::string tag) {
    auto core = core_;
    detail::run_blocking_on(core->rpc->get_executor(), [&] { core->tag = std::move(tag); });
  }
  /// Starts later rounds as soon as `size` members joined (clamped to [min_group_size,
  /// target_group_size]; 0: target_group_size again). For a caller that knows how many peers
  /// are there, e.g. from a progress tracker. Any thread.
  void set_target_group_size(std::size_t size) noexcept { core_->target_override.store(size); }
  /// True for an auxiliary peer (AveragerOptions::auxiliary).
  [[nodiscard]] bool auxiliary() const noexcept { return core_->options.auxiliary(); }

  /// The peers banned from this peer's groups now (for sending what failed validation), with
  /// when each ban ends and why. Any thread but the DHT's io threads.
  [[nodiscard]] std::vector<Ban> banned_peers() const {
    std::vector<Ban> out;
    auto core = core_;
    detail::run_blocking_on(core->rpc->get_executor(), [&] { out = core->bans->list(); });
    return out;
  }
  /// Lifts the ban on the peer with id or address `peer`, if any (an operator who knows
  /// better). Any thread but the DHT's io threads.
  void lift_ban(const std::string& peer) {
    auto core = core_;
    detail::run_blocking_on(core->rpc->get_executor(), [&] { core->bans->lift(peer); });
  }

  /// Stops matchmaking and averaging (a round in progress fails), stops answering; idempotent.
  /// The tensors are left as they are.
  void shutdown() {
    if (!core_) return;
    auto core = core_;
    detail::run_blocking_on(core->rpc->get_executor(), [&] { core->close(); });
  }

 private:
  using Runner = typename A::template Runner<T>;

  void check_weight(double weight) const {
    HIVE_CHECK(std::isfinite(weight) && weight >= 0 && weight <= core_->options.max_weight(),
               "averaging weight must be a finite number in [0, max_weight = {}], got {}", core_->options.max_weight(),
               weight);
  }
  enum class Phase { idle, looking, requesting, following, running };

  // A join request waiting in the leader's handler: the requester and the followers it brings.
  struct Waiter {
    std::vector<Member> block;
    detail::Event decided;
    std::optional<GroupInfo> group;
    std::string reason;
  };

  // What a peer announced under the group key.
  struct Candidate {
    std::string address;
    double deadline = 0;
  };

  // Everything runs on the Rpc's strand; the handlers hold a weak reference.
  struct Core : std::enable_shared_from_this<Core> {
    Core(dht_type& dht, std::vector<at::Tensor> tensors_in, AveragerOptions options_in)
        : options(std::move(options_in)),
          node(dht.node()),
          rpc(dht.node()->rpc()),
          tensors(std::move(tensors_in)),
          keys(options.prefix(), options.initial_group_bits()),
          runner(std::make_shared<Runner>(rpc)) {
      HIVE_CHECK(options.target_group_size() >= 2, "target_group_size must be at least 2, got {}",
                 options.target_group_size());
      HIVE_CHECK(options.min_group_size() >= 2 && options.min_group_size() <= options.target_group_size(),
                 "min_group_size must be in [2, target_group_size], got {}", options.min_group_size());
      HIVE_CHECK(options.matchmaking_time() > Seconds(0), "matchmaking_time must be positive");
      HIVE_CHECK(options.part_size_bytes() >= 4, "part_size_bytes must be at least 4");
      HIVE_CHECK(std::isfinite(options.bandwidth()) && options.bandwidth() >= 0, "bandwidth must be a finite number >= 0, got {}",
                 options.bandwidth());
      HIVE_CHECK(options.reducer_timeout() > Seconds(0), "reducer_timeout must be positive");
      options.aggregation().validate(options.min_group_size());
      HIVE_CHECK(std::isfinite(options.max_weight()) && options.max_weight() > 0,
                 "max_weight must be a finite number > 0, got {}", options.max_weight());
      HIVE_CHECK(std::isfinite(options.ban_duration().count()) && options.ban_duration() >= Seconds(0),
                 "ban_duration must be a finite number of seconds >= 0, got {}", options.ban_duration().count());
      for (const auto& t : tensors)
        HIVE_CHECK(t.defined() && at::isFloatingType(t.scalar_type()), "averaged tensors must be floating point");
      visible_addresses = [&dht] { return dht.visible_addresses(); };
      const auto visible = visible_addresses();
      address = visible.empty() ? std::string() : visible.front();
      client_mode = options.client_mode() || address.empty();
      if (client_mode) address.clear();
      HIVE_CHECK(!(client_mode && options.auxiliary()),
                 "an auxiliary peer reduces parts, so others must reach it: it cannot be in client mode{}",
                 options.client_mode() ? "" : " (its DHT peer has no reachable address)");
      join_name = method_for(join_method, options.prefix());
      part_name = method_for(part_method, options.prefix());
      state_name = method_for(state_method, options.prefix());
      schema = schema_hash(tensors);
      settings.compression = options.compression();
      settings.chunk_elements = std::max<std::int64_t>(1, options.part_size_bytes() / 4);
      settings.sender_timeout = options.sender_timeout();
      settings.reducer_timeout = options.reducer_timeout();
      settings.method = part_name;
      settings.timeout = options.allreduce_timeout();
      settings.registration_timeout = options.request_timeout();
      settings.limits = rpc->transport().limits();
      settings.aggregation = options.aggregation();
      settings.max_weight = options.max_weight();
      settings.ban_duration = options.ban_duration();
      settings.bans = bans;
      settings.tamper_outgoing_for_testing = options.tamper_outgoing_for_testing();
      state = std::make_shared<StateSharing<T, R>>(
          node, keys.state_key(), address,
          StateSharingOptions().declare_period(options.declare_state_period()).part_bytes(options.state_part_bytes()),
          state_name);
    }

    void start() {
      std::weak_ptr<Core> weak = this->shared_from_this();
      auto guard = [weak](auto body) {
        return [weak, body](net::CallContext ctx, Message m) -> asio::awaitable<Message> {
          auto self = weak.lock();
          if (!self || self->closed) throw Error(errc::shutdown, "no averager runs on this peer");
          co_return co_await body(self, std::move(ctx), std::move(m));
        };
      };
      // One averager per prefix and peer: the methods carry the prefix, and a second averager
      // of the same run would silently take over the first one's rounds.
      const bool fresh = rpc->try_add_handler(join_name, guard([](std::shared_ptr<Core> self, net::CallContext ctx, Message m) {
        return self->serve_join(std::move(ctx), std::move(m));
      }));
      HIVE_CHECK(fresh, "this DHT peer already runs an averager with prefix '{}': give each averager its own prefix",
                 options.prefix());
      rpc->add_handler(part_name, guard([](std::shared_ptr<Core> self, net::CallContext ctx, Message m) {
                         return self->runner->serve(std::move(ctx), std::move(m), self->settings);
                       }));
      rpc->add_handler(state_name, guard([](std::shared_ptr<Core> self, net::CallContext, Message m) {
                         return self->state->serve(std::move(m));
                       }));
    }

    void close() {
      if (closed) return;
      closed = true;
      for (const auto* method : {&join_name, &part_name, &state_name}) rpc->remove_handler(*method);
      state->close();
      changed.notify_all();
      for (auto& w : waiters) {
        w->reason = "the leader is shutting down";
        w->decided.set();
      }
      waiters.clear();
      runner->close();
    }

    // ----- matchmaking: the leader's side -----

    asio::awaitable<Message> serve_join(net::CallContext ctx, Message m) {
      // The requester is the peer its connection proved; its followers are the ones it vouches for.
      JoinRequest request = decode_join_request(m.header, std::move(ctx.peer));
      auto reject = [](std::string reason, bool final) {
        return Message{{{"accepted", false}, {"reason", std::move(reason)}, {"final", final}}, {}};
      };
      if (client_mode) co_return reject("this peer is in client mode and leads no group", true);
      if (phase == Phase::requesting) co_return reject("this peer is asking another leader", false);
      if (phase != Phase::looking) co_return reject("this peer is not looking for a group", true);
      if (request.key != keys.group_key()) co_return reject("different group key", true);
      if (request.schema != matched_schema())
        co_return reject(tag.empty() ? "different tensor shapes" : "different tensor shapes or round tag", true);
      if (request.compression != nlohmann::json(settings.compression)) co_return reject("different compression", true);
      auto& block = request.block;
      if (group_members() + block.size() > options.target_group_size()) co_return reject("the group is full", true);
      const auto same = [](const Member& a, const Member& b) {
        return (!a.peer.empty() && a.peer == b.peer) || (!a.client_mode && !b.client_mode && a.address == b.address);
      };
      for (const auto& member : block) {
        if (bans->banned(ban_key(member)))
          co_return reject(fmt::format("{} is banned from this peer's groups", ban_key(member)), true);
        if (same(member, Member{address, false, false, 0, {}, rpc->peer_id()}))
          co_return reject("the request names this leader as a member", true);
        for (const auto& w : waiters)
          for (const auto& other : w->block)
            if (same(other, member)) co_return reject("already in this group", true);
      }
      auto waiter = std::make_shared<Waiter>();
      waiter->block = std::move(block);
      waiters.push_back(waiter);
      changed.notify_all();
      co_await waiter->decided.wait(my_deadline + to_duration(options.request_timeout()));
      if (!waiter->decided.is_set()) std::erase(waiters, waiter);
      if (!waiter->group) co_return reject(waiter->reason.empty() ? "the leader gave up" : waiter->reason, true);
      nlohmann::json members = waiter->group->members;
      co_return Message{{{"accepted", true},
                         {"group_id", waiter->group->group_id},
                         {"members", std::move(members)},
                         {"index", waiter->group->my_index}},
                        {}};
    }

    // The owner marker this peer's announcements carry: its own, where the routing model signs
    // records (then only this peer can write them), else none.
    [[nodiscard]] std::string owner_marker() const {
      return dht::signs_records<typename dht_type::node_type> ? rpc->identity().owner_marker() : std::string();
    }

    // What peers must share to meet: the tensors' shapes, and the round tag if any.
    [[nodiscard]] std::string matched_schema() const { return tag.empty() ? schema : schema + "@" + tag; }

    // The members a leader starts the round with at once.
    [[nodiscard]] std::size_t target_size() const {
      const auto n = target_override.load();
      return n == 0 ? options.target_group_size() : std::clamp(n, options.min_group_size(), options.target_group_size());
    }

    // Members of the group this peer leads now (itself and every waiting block).
    [[nodiscard]] std::size_t group_members() const {
      std::size_t n = 1;
      for (const auto& w : waiters) n += w->block.size();
      return n;
    }

    // Tells each waiting block its place in `group`, whose members from `first` on are theirs.
    static void decide(std::vector<std::shared_ptr<Waiter>>& blocks, const GroupInfo& group, std::size_t first) {
      for (auto& w : blocks) {
        w->group = group;
        w->group->my_index = first;
        first += w->block.size();
        w->decided.set();
      }
      blocks.clear();
    }

    // ----- matchmaking: the follower's side -----

    asio::awaitable<std::vector<Candidate>> candidates(const std::string& key) {
      std::vector<Candidate> out;
      auto op = node->get(Id160::of(key), true);
      auto record = co_await std::move(op);
      if (!record) co_return out;
      auto decoded = dht_type::decode(*record);
      if (!decoded) co_return out;
      const double now = node->now();
      for (const auto& [subkey, v] : decoded->dictionary) {
        // Anyone can write under the group key: malformed entries are skipped.
        const auto a = decode_announcement(subkey, v.value);
        if (!a || a->address == address || a->peer == rpc->peer_id()) continue;
        // Where records are signed, an announcement without its owner's signature names a peer
        // that did not write it (the DHT dropped forged signed ones already).
        if (a->peer.empty() && dht::signs_records<typename dht_type::node_type>) continue;
        if (bans->banned(a->peer.empty() ? a->address : a->peer)) continue;  // never joins a peer it banned
        Candidate c{a->address, a->deadline};
        // Clocks of separate machines differ: a leader whose deadline seems just past may still
        // be looking (it says so if not).
        if (c.deadline + max_clock_offset <= now) continue;
        if (a->schema != matched_schema() || !a->looking) continue;
        // Join only peers that rank before this one, so that no two peers wait on each other.
        if (!client_mode && std::tie(c.deadline, c.address) >= std::tie(my_deadline_wall, address)) continue;
        out.push_back(std::move(c));
      }
      std::sort(out.begin(), out.end(),
                [](const Candidate& a, const Candidate& b) { return std::tie(a.deadline, a.address) < std::tie(b.deadline, b.address); });
      co_return out;
    }

    asio::awaitable<JoinAnswer> request_join(const Candidate& leader, const nlohmann::json& gathered,
                                            const std::vector<std::shared_ptr<Waiter>>& bringing) {
      JoinAnswer out;
      Message request;
      request.header = {{"key", keys.group_key()}, {"schema", matched_schema()}, {"compression", settings.compression},
                        {"address", address},     {"client_mode", client_mode}, {"gathered", gathered},
                        {"auxiliary", options.auxiliary()}, {"bandwidth", options.bandwidth()}};
      if (!bringing.empty()) {
        auto followers = nlohmann::json::array();
        for (const auto& w : bringing)
          for (const auto& m : w->block) followers.push_back(m);
        request.header["followers"] = std::move(followers);
      }
      // Anyone can announce any deadline: a day bounds the wait (a client-mode peer asks leaders
      // of any deadline), and keeps it from overflowing the clock's integer durations.
      const auto ahead = std::clamp(leader.deadline - node->now(), 0.0, 86400.0);
      const auto wait = Seconds(ahead + max_clock_offset) + options.request_timeout();
      try {
        auto op = rpc->co_call(leader.address, join_name, std::move(request), wait);
        Message reply = co_await std::move(op);
        std::size_t brought = 0;
        for (const auto& w : bringing) brought += w->block.size();
        out = decode_join_reply(reply.header, address, client_mode, brought, rpc->peer_id());
      } catch (const std::exception& e) {
        out.group.reset();
        out.final = true;
        out.reason = e.what();
      }
      co_return out;
    }

    // Finds a group until `end`: joins a better-ranked leader, or leads one.
    asio::awaitable<std::optional<GroupInfo>> matchmake(Deadline end, nlohmann::json gathered, std::string& why) {
      my_deadline = end;
      my_deadline_wall = node->now() + std::chrono::duration_cast<Seconds>(end - SteadyClock::now()).count();
      waiters.clear();
      my_gathered = gathered;
      phase = Phase::looking;
      const auto key = keys.group_key();
      if (!client_mode) {
        // Behind NAT the relayed address changes when a relay is replaced: announce the current one.
        if (auto visible = visible_addresses(); !visible.empty() && visible.front() != address) {
          log::info("averaging", "this peer's address is now {} (was {})", visible.front(), address);
          address = visible.front();
        }
        std::vector<dht::StoreItem> items{{Id160::of(key), dht::Subkey(announcement_subkey(owner_marker(), address)),
                                           nlohmann::json::to_msgpack(nlohmann::json{{"deadline", my_deadline_wall}, {"schema", matched_schema()}}),
                                           // outlives the deadline by the clock tolerance, so that
                                           // replicas whose clocks run ahead still hold it
                                           my_deadline_wall + max_clock_offset}};
        dht::sign_items(*node, items);
        auto op = node->store_many(std::move(items));
        auto stored = co_await std::move(op);
        if (!stored.at(0)) log::debug("averaging", "announcing {} under {} reached no replica", address, key);
      }
      std::set<std::string> refused;
      const auto poll = to_duration(std::min(Seconds(0.2), options.matchmaking_time() / 10));
      std::string last_reason;
      while (!closed && SteadyClock::now() < end && group_members() < target_size()) {
        // Even a peer that already leads followers asks better-ranked leaders, bringing its
        // followers along: groups that formed around different peers merge.
        auto op = candidates(key);
        auto found = co_await std::move(op);
        for (const auto& c : found) {
          if (closed || SteadyClock::now() >= end || group_members() >= target_size()) break;
          if (refused.contains(c.address)) continue;
          phase = Phase::requesting;
          auto bringing = waiters;
          auto join = request_join(c, gathered, bringing);
          auto reply = co_await std::move(join);
          if (reply.group) {
            phase = Phase::following;
            std::erase_if(waiters, [&](const auto& w) { return std::find(bringing.begin(), bringing.end(), w) != bringing.end(); });
            decide(bringing, *reply.group, reply.group->my_index + 1);
            co_return std::move(reply.group);
          }
          phase = Phase::looking;
          last_reason = fmt::format("{}: {}", c.address, reply.reason);
          if (reply.final) refused.insert(c.address);
        }
        if (closed || group_members() >= target_size()) break;
        co_await changed.wait(std::min(end, SteadyClock::now() + poll));
      }
      if (closed) {
        why = "the averager is shutting down";
        co_return std::nullopt;
      }
      // This peer leads whoever joined it.
      std::vector<std::shared_ptr<Waiter>> followers;
      followers.swap(waiters);
      std::size_t members = 1;
      for (const auto& w : followers) members += w->block.size();
      if (members < options.min_group_size()) {
        why = followers.empty() ? fmt::format("no group found in {:.1f} s{}", options.matchmaking_time().count(),
                                              last_reason.empty() ? "" : " (last refusal: " + last_reason + ")")
                                : fmt::format("only {} peers met, min_group_size is {}", members, options.min_group_size());
        for (auto& w : followers) {
          w->reason = why;
          w->decided.set();
        }
        phase = Phase::idle;
        co_return std::nullopt;
      }
      GroupInfo g;
      g.group_id = Id160::random().hex().substr(0, 24);
      g.members.push_back(Member{address, false, options.auxiliary(), options.bandwidth(), my_gathered, rpc->peer_id()});
      for (const auto& w : followers)
        for (const auto& m : w->block) g.members.push_back(m);
      decide(followers, g, 1);
      phase = Phase::running;
      g.my_index = 0;
      co_return g;
    }

    // Overwrites this peer's announcement under the group key with "not looking" (a record
    // that expires a moment later wins), so that others stop asking it; in the background.
    void withdraw() {
      if (client_mode || my_deadline_wall + max_clock_offset <= node->now()) return;
      std::vector<dht::StoreItem> items{{Id160::of(keys.group_key()), dht::Subkey(announcement_subkey(owner_marker(), address)),
                                         nlohmann::json::to_msgpack(nlohmann::json{{"looking", false}}),
                                         my_deadline_wall + max_clock_offset + 1e-3}};
      dht::sign_items(*node, items);
      auto op = [self = this->shared_from_this(), items = std::move(items)]() mutable -> asio::awaitable<void> {
        try {
          auto store = self->node->store_many(std::move(items));
          co_await std::move(store);
        } catch (const std::exception& e) {
          log::debug("averaging", "withdrawing the group announcement failed: {}", e.what());
        }
      };
      asio::co_spawn(rpc->get_executor(), std::move(op), asio::detached);
    }

    // ----- one step -----

    asio::awaitable<StepResult> round(double weight, nlohmann::json gathered,
                                      std::function<asio::awaitable<void>(RoundContext&)> body) {
      StepResult result;
      if (closed) {
        result.error = "the averager is shut down";
        result.code = errc::shutdown;
        co_return result;
      }
      if (busy) {
        result.error = "another step of this averager is running";
        result.code = errc::invalid_argument;
        co_return result;
      }
      busy = true;
      struct Reset {
        Core* core;
        ~Reset() {
          core->busy = false;
          core->phase = Phase::idle;
        }
      } reset{this};
      auto self = this->shared_from_this();
      const auto started = SteadyClock::now();
      std::string why;
      auto mm = matchmake(deadline_after(options.matchmaking_time()), std::move(gathered), why);
      auto group = co_await std::move(mm);
      withdraw();
      const auto matched = SteadyClock::now();
      if (group) log::debug("averaging", "{}: {} all-reduce in a group of {}", keys.group_key(), A::name, group->size());
      result.matchmaking_s = std::chrono::duration<double>(matched - started).count();
      if (!group) {
        result.error = why;
        result.code = closed ? std::error_code(errc::shutdown) : std::error_code(errc::timeout);
        co_return result;
      }
      result.group_size = group->size();
      result.group_id = group->group_id;
      for (const auto& m : group->members) result.gathered.push_back(m.gathered);
      // An auxiliary peer lends its bandwidth: it weighs nothing and keeps nothing.
      if (options.auxiliary()) weight = 0;
      std::error_code failed;
      try {
        if (body) {
          RoundContext context;
          context.group = *group;
          context.weight = weight;
          auto dropped = std::make_shared<std::vector<DroppedMember>>();
          context.allreduce = [self, g = *group, dropped](at::Tensor flat, double w, std::string phase) -> asio::awaitable<Reduced> {
            GroupInfo phased = g;
            phased.group_id += "." + phase;
            auto op = self->runner->run(phased, std::move(flat), w, self->settings);
            auto reduced = co_await std::move(op);
            for (const auto& d : reduced.dropped)
              if (std::none_of(dropped->begin(), dropped->end(), [&](const DroppedMember& x) { return x.index == d.index; }))
                dropped->push_back(d);
            co_return reduced;
          };
          auto op = body(context);
          co_await std::move(op);
          result.dropped = std::move(*dropped);
        } else {
          at::Tensor flat;
          {
            std::lock_guard lock(tensors_mutex);
            flat = flatten_tensors(tensors, &flat_vector);
          }
          auto op = runner->run(*group, flat, weight, settings);
          auto reduced = co_await std::move(op);
          if (!options.auxiliary()) {
            std::lock_guard lock(tensors_mutex);
            unflatten_into(reduced.average, tensors);
          }
          result.unaveraged = std::move(reduced.unaveraged);
          result.dropped = std::move(reduced.dropped);
        }
      } catch (const std::system_error& e) {  // hive::Error, hive::RemoteError
        result.error = e.what();
        failed = e.code();
      } catch (const std::exception& e) {  // a torch error writing the average back
        result.error = e.what();
        failed = errc::round_failed;
      }
      result.allreduce_s = std::chrono::duration<double>(SteadyClock::now() - matched).count();
      if (failed) {
        result.code = failed;
        co_return result;
      }
      keys.update(group->my_index, group->size());
      result.ok = true;
      co_return result;
    }

    static SteadyClock::duration to_duration(Seconds s) { return std::chrono::duration_cast<SteadyClock::duration>(s); }

    AveragerOptions options;
    std::shared_ptr<typename dht_type::node_type> node;
    std::shared_ptr<net::Rpc<T>> rpc;
    std::vector<at::Tensor> tensors;
    std::mutex tensors_mutex;
    ReusedVector flat_vector;  // each round's flattened tensors
    GroupKeys keys;
    std::shared_ptr<Runner> runner;
    std::shared_ptr<BanList> bans = std::make_shared<BanList>();  // before settings, which share it
    AllReduceSettings settings;
    std::string address;
    std::function<std::vector<std::string>()> visible_addresses;  // the DHT peer's, current
    bool client_mode = false;
    std::string join_name, part_name, state_name;  // the methods, with the prefix
    std::string schema;
    std::string tag;  // set_round_tag()
    bool closed = false;
    bool busy = false;
    std::atomic<std::size_t> target_override{0};  // set_target_group_size()
    Phase phase = Phase::idle;
    Deadline my_deadline{};
    double my_deadline_wall = 0;
    nlohmann::json my_gathered;
    std::vector<std::shared_ptr<Waiter>> waiters;
    detail::Notifier changed;
    std::shared_ptr<StateSharing<T, R>> state;
  };

  std::shared_ptr<Core> core_;
};

}  // namespace hive::averaging
