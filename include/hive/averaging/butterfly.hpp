#pragma once
/// @file
/// Butterfly all-reduce: every member averages one part of the flattened vector, receiving
/// that part from every member chunk by chunk and answering each chunk with its average.

#include <hive/averaging/group.hpp>
#include <hive/averaging/robust.hpp>
#include <hive/core/clock.hpp>
#include <hive/core/log.hpp>
#include <hive/core/tensor_codec.hpp>
#include <hive/detail/event.hpp>
#include <hive/net/rpc.hpp>
#include <hive/net/transport.hpp>

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace hive::averaging {

/// Copies `src` into `dst` (tensors of one number of elements; `dst` contiguous) and returns
/// whether every value copied is finite, as `dst.copy_(src)` followed by `all_finite(dst)` but
/// reading `src` once: for float32 CPU vectors each block is checked while it is still in
/// cache. `dst` holds the copy either way, in its own dtype, which is what is checked (a
/// float64 1e300 is not finite as float32). Throws hive::InvalidArgument when the sizes
/// differ or `dst` is not contiguous.
[[nodiscard]] inline bool copy_and_check_finite(const at::Tensor& dst, const at::Tensor& src) {
  HIVE_CHECK(dst.numel() == src.numel(), "copy of {} elements into {}", src.numel(), dst.numel());
  HIVE_CHECK(dst.is_contiguous(), "copy_and_check_finite writes into a contiguous tensor only");
  if (dst.scalar_type() != at::kFloat || src.scalar_type() != at::kFloat || !src.is_contiguous() ||
      !dst.device().is_cpu() || !src.device().is_cpu()) {
    dst.copy_(src.reshape(dst.sizes()));
    return all_finite(dst);
  }
  const auto n = static_cast<std::size_t>(src.numel());
  const auto* from = static_cast<const std::uint32_t*>(src.data_ptr());
  auto* to = static_cast<std::uint32_t*>(dst.data_ptr());
  constexpr std::size_t block = 4096;                    // 16 KiB, checked while in L1
  constexpr std::uint32_t exponent = 0x7f800000;         // all ones: an infinity or a NaN
  bool bad = false;
  for (std::size_t i = 0; i < n; i += block) {
    const std::size_t end = std::min(n, i + block);
    std::memcpy(to + i, from + i, (end - i) * sizeof(std::uint32_t));
    for (std::size_t j = i; j < end; ++j) bad |= (to[j] & exponent) == exponent;
  }
  return !bad;
}

/// Method a member calls to send a chunk of its vector to the chunk's reducer; the reply is the
/// chunk's group average. An averager serves it as `avg.part:<prefix>` (method_for), so that
/// several averagers (gradients, state) share one DHT peer.
inline constexpr std::string_view part_method = "avg.part";

/// What an all-reduce left behind.
struct Reduced {
  /// This peer's vector after the round: the group's average, except in `unaveraged`.
  at::Tensor average;
  /// Element ranges that kept this peer's own values because their reducer failed (died,
  /// stalled past reducer_timeout, or answered with an error, or was dropped from the round);
  /// empty when all was averaged.
  std::vector<Range> unaveraged;
  /// Members this peer dropped from the round for sending what failed validation (or because
  /// they were banned here), in the group's order.
  std::vector<DroppedMember> dropped;
};

/// What one all-reduce needs to know besides the group and the vector.
struct AllReduceSettings {
  /// Compression of chunks in both directions.
  Compression compression = Compression::none;
  /// Largest chunk, in elements.
  std::int64_t chunk_elements = std::int64_t{1} << 17;
  /// How long a reducer waits for a missing sender after a chunk's first arrival; then it
  /// averages the senders that arrived.
  Seconds sender_timeout = Seconds(10);
  /// Bound on the whole all-reduce.
  Seconds timeout = Seconds(60);
  /// How long a sender waits for a reducer's answer to one chunk; then the chunk keeps the
  /// sender's own values.
  Seconds reducer_timeout = Seconds(20);
  /// How long a chunk that arrives before this peer knows its round waits for it.
  Seconds registration_timeout = Seconds(3);
  /// The method the runner calls on other members (method_for(part_method, prefix)).
  std::string method = std::string(part_method);
  /// Bounds on what the peer decodes.
  Limits limits{};
  /// How a reducer aggregates each chunk (plain weighted mean by default).
  AggregationOptions aggregation{};
  /// Largest weight a member may claim; a chunk with a weight that is not a finite number in
  /// [0, max_weight] gets its sender dropped.
  double max_weight = 1e6;
  /// How long a member dropped for a bad chunk stays banned in `bans` (0: dropped, not banned).
  Seconds ban_duration = Seconds(300);
  /// This peer's bans (members in it are dropped from a round at its start, members that send
  /// bad chunks are added); none when null.
  std::shared_ptr<BanList> bans;
  /// FOR TESTING ATTACKS ONLY: applied to every chunk this peer sends to another member.
  PartTamper tamper_outgoing_for_testing;
};

/// The all-reduce policy slot for transport T: what DecentralizedAverager<T, R, A> needs of A.
///
/// A model names itself (`A::name`, in logs) and provides `Runner<T>`, constructible from a
/// peer's `std::shared_ptr<net::Rpc<T>>`, with `run(group, flat, weight, settings)` (awaitable:
/// a Reduced, the group's weighted average of `flat` and the ranges that kept local values),
/// `serve(context, request, settings)` (the handler of settings.method; `context.peer` is the
/// caller's proven peer id) and `close()`. See docs/concepts/strategy.md.
template <class A, class T>
concept StrategyFor = net::Transport<T> && requires {
  { A::name } -> std::convertible_to<std::string_view>;
  typename A::template Runner<T>;
} && std::constructible_from<typename A::template Runner<T>, std::shared_ptr<net::Rpc<T>>> &&
    requires(typename A::template Runner<T>& r, const GroupInfo& g, at::Tensor t, double w, const AllReduceSettings& s,
             Message m, net::CallContext ctx) {
      { r.run(g, t, w, s) } -> std::same_as<asio::awaitable<Reduced>>;
      { r.serve(std::move(ctx), std::move(m), s) } -> std::same_as<asio::awaitable<Message>>;
      r.close();
    };

/// The all-reduce policy slot (the `strategy` of a policy bundle): a StrategyFor every
/// transport, checked against net::archetype::Transport. Models: Butterfly (the default) and
/// Gloo (<hive/averaging/gloo.hpp>).
template <class A>
concept Strategy = StrategyFor<A, net::archetype::Transport>;

/// Butterfly all-reduce (the default Strategy).
///
/// The flattened vector is split among the members that are not in client mode (evenly, or in
/// proportion to the bandwidths they announced: partition()); member r reduces part r. Every
/// member but an auxiliary one sends each chunk of part r to member r, which aggregates the
/// chunks (the weighted mean, or a robust method: AllReduceSettings::aggregation), waits for
/// all senders (or sender_timeout after the chunk's first arrival, then aggregates those that
/// came), and answers every sender with the same encoded result, so all members end with
/// identical values even under lossy compression. A chunk whose reducer fails (dies, does not
/// answer within reducer_timeout, or answers with an error) keeps the sender's own values, and
/// Reduced::unaveraged names it (hivemind's rule); the round fails only when no chunk at all
/// came back.
///
/// A reducer takes a member's chunks only from the caller that proves the member's peer id
/// (Member::peer, as the leader saw it prove it): a member cannot send under another's index.
///
/// A member whose chunk fails validation (not one float vector of the chunk's length, values
/// that are not finite, a weight outside [0, max_weight]) is dropped from the round by the
/// peer that received it, as if it had died: its later chunks are refused, no chunk waits for
/// it, and the part it reduces keeps this peer's values; it is banned (AllReduceSettings::bans)
/// for ban_duration. A reducer that answers with such a chunk is dropped the same way.
struct Butterfly {
  /// The strategy's name (in logs).
  static constexpr std::string_view name = "butterfly";

  /// One peer's side of butterfly all-reduce: the reductions it serves and the rounds it runs.
  /// Every member function runs on the Rpc's strand.
  template <net::Transport T>
  class Runner : public std::enable_shared_from_this<Runner<T>> {
   public:
    /// A runner that talks through `rpc`.
    explicit Runner(std::shared_ptr<net::Rpc<T>> rpc) : rpc_(std::move(rpc)) {}

    /// The group's aggregate of `flat` (float32, one dimension; the weighted mean by default),
    /// with the ranges that kept this peer's values and the members it dropped (see
    /// Butterfly). Throws hive::InvalidArgument for a weight outside [0, s.max_weight] or bad
    /// aggregation options, and hive::Error when nothing was averaged (errc::round_failed,
    /// errc::timeout, errc::shutdown) or `flat` holds non-finite values
    /// (errc::invalid_argument; this peer then sends nothing); the caller then keeps its
    /// tensors. An auxiliary member serves its part until every chunk of it is averaged and
    /// returns `flat` as it was.
    asio::awaitable<Reduced> run(const GroupInfo& group, at::Tensor flat, double weight, const AllReduceSettings& s) {
      HIVE_CHECK(std::isfinite(weight) && weight >= 0 && weight <= s.max_weight,
                 "averaging weight must be a finite number in [0, max_weight = {}], got {}", s.max_weight, weight);
      s.aggregation.validate();
      HIVE_CHECK(group.my_index < group.size(), "member index {} outside a group of {}", group.my_index, group.size());
      flat = flat.contiguous();
      const auto reducers = group.reducers();
      HIVE_CHECK(!reducers.empty(), "a group of client-mode peers only cannot average");
      HIVE_CHECK(group.senders() > 0, "a group of auxiliary peers only has nothing to average");
      const bool auxiliary = group.members[group.my_index].auxiliary;
      // The round's result starts as this peer's values. Others would drop this peer for
      // non-finite ones (and ban it): it sends nothing instead.
      at::Tensor result;
      if (!auxiliary) {
        result = results_.take(flat.numel());
        if (!copy_and_check_finite(result, flat))
          throw Error(errc::invalid_argument, "this peer's tensors hold non-finite values (NaN or infinity): not averaged");
      }
      // Members banned here take no part in this peer's side of the round.
      std::vector<std::string> excluded(group.size());
      if (s.bans)
        for (std::size_t i = 0; i < group.size(); ++i)
          if (auto ban = s.bans->find(ban_key(group.members[i])); ban && i != group.my_index)
            excluded[i] = fmt::format("banned here ({})", ban->reason);
      const auto parts = partition(group, flat.numel());
      const auto deadline = deadline_after(s.timeout);
      std::shared_ptr<Reduction> mine;
      for (std::size_t p = 0; p < reducers.size(); ++p)
        if (reducers[p] == group.my_index) mine = add_reduction(group, parts[p], s, excluded);
      if (auxiliary) {
        // Nothing to send: serve this peer's part until each chunk is averaged (or fails).
        if (mine)
          for (auto& c : mine->chunks) {
            co_await c->finished.wait(deadline);
            if (closed_) throw Error(errc::shutdown, "the averager is shutting down");
          }
        co_return Reduced{flat, {}, dropped_members(group, mine.get(), excluded)};
      }

      struct Send {
        std::size_t member;
        std::size_t chunk;
        Range range;
        bool ok = false;
      };
      struct Round {
        at::Tensor result;
        std::vector<Send> sends;
        std::size_t pending = 0;
        std::string error;
        std::vector<std::string> dropped;  // reason per member, from its answers
        bool shutdown = false;
        detail::Event done;
      };
      auto round = std::make_shared<Round>();
      round->result = std::move(result);
      round->dropped = excluded;
      for (std::size_t p = 0; p < reducers.size(); ++p) {
        const auto chunks = chunks_of(parts[p], s.chunk_elements);
        for (std::size_t k = 0; k < chunks.size(); ++k) round->sends.push_back({reducers[p], k, chunks[k]});
      }
      auto self = this->shared_from_this();
      for (std::size_t i = 0; i < round->sends.size(); ++i) {
        const auto member = round->sends[i].member;
        if (!excluded[member].empty()) continue;  // its part keeps this peer's values
        ++round->pending;
        const auto chunk_index = round->sends[i].chunk;
        const auto range = round->sends[i].range;
        auto send = [self, round, mine, group, i, member, range, chunk_index, weight, s, deadline,
                     piece = flat.slice(0, range.begin, range.end)]() -> asio::awaitable<void> {
          try {
            const auto into = round->result.slice(0, range.begin, range.end);
            if (member == group.my_index) {
              auto op = self->contribute(group.group_id, group.my_index, chunk_index, weight, piece, {}, deadline,
                                         group.members[group.my_index].peer);
              auto encoded = co_await std::move(op);
              into.copy_(decode_tensor(encoded.descriptor, encoded.payload, s.limits).reshape({-1}));
            } else {
              Message request;
              request.header = {{"group", group.group_id}, {"sender", group.my_index}, {"chunk", chunk_index},
                                {"weight", weight}, {"compression", s.compression}};
              add_tensors(request, {s.tamper_outgoing_for_testing ? s.tamper_outgoing_for_testing(piece) : piece},
                          s.compression);
              const auto left = std::min(std::chrono::duration_cast<Seconds>(deadline - SteadyClock::now()), s.reducer_timeout);
              auto op = self->rpc_->co_call(group.members[member].address, s.method, std::move(request),
                                            std::max(left, Seconds(0.001)));
              auto reply = co_await std::move(op);
              std::string bad;
              try {
                auto tensors = get_tensors(reply, s.limits);
                if (tensors.size() != 1 || tensors[0].numel() != range.size()) {
                  bad = fmt::format("answered {} tensors instead of one of {} elements", tensors.size(), range.size());
                } else if (!copy_and_check_finite(into, tensors[0])) {
                  into.copy_(piece);  // the chunk keeps this peer's values
                  bad = fmt::format("answered chunk {} with non-finite values", chunk_index);
                }
              } catch (const std::exception& e) {
                into.copy_(piece);  // nor what a copy that failed part-way left
                bad = fmt::format("answered chunk {} with a malformed tensor: {}", chunk_index, e.what());
              }
              if (!bad.empty()) {
                // A reducer that answers garbage is dropped from the round and banned, as a
                // sender of garbage is.
                if (round->dropped[member].empty()) round->dropped[member] = bad;
                if (mine) drop(*mine, member, bad, true);
                else if (s.bans) s.bans->ban(group.members[member].peer, group.members[member].address, s.ban_duration, bad);
                throw Error(errc::bad_tensor, bad);
              }
            }
            round->sends[i].ok = true;
          } catch (const std::exception& e) {
            // The chunk keeps this peer's values (round->result started as a copy of flat).
            if (round->error.empty())
              round->error = fmt::format("chunk {} of member {} ({}): {}", chunk_index, member,
                                         member == group.my_index ? "this peer" : group.members[member].address, e.what());
            if (const auto* se = dynamic_cast<const std::system_error*>(&e); se && se->code() == errc::shutdown)
              round->shutdown = true;
          }
          if (--round->pending == 0) round->done.set();
        };
        asio::co_spawn(rpc_->get_executor(), std::move(send), asio::detached);
      }
      if (round->pending == 0) round->done.set();
      // Every send is bounded by the deadline; the extra second lets the last ones report.
      const bool finished = co_await round->done.wait(deadline + std::chrono::seconds(1));
      if (closed_ || round->shutdown) throw Error(errc::shutdown, "the averager is shutting down");
      if (!finished) throw Error(errc::timeout, fmt::format("all-reduce did not finish within {:.1f} s", s.timeout.count()));
      // A member dropped from the round (by this peer's reduction, or for its answers) counts
      // as dead: the part it reduced keeps this peer's values even where it answered. This
      // peer's own chunks waited for every sender, so by now it knows every sender it drops.
      auto dropped = dropped_members(group, mine.get(), round->dropped);
      std::vector<bool> is_dropped(group.size(), false);
      for (const auto& d : dropped) is_dropped[d.index] = true;
      std::vector<Range> unaveraged;
      std::size_t averaged = 0;
      for (const auto& sd : round->sends) {
        if (sd.ok && !is_dropped[sd.member]) {
          ++averaged;
          continue;
        }
        if (sd.ok) round->result.slice(0, sd.range.begin, sd.range.end).copy_(flat.slice(0, sd.range.begin, sd.range.end));
        unaveraged.push_back(sd.range);
      }
      if (averaged == 0)
        throw Error(errc::round_failed, round->error.empty() ? std::string("every reducer was dropped") : round->error);
      if (!unaveraged.empty())
        log::info("averaging", "round {}: {} of {} chunks kept local values (first: {})", group.group_id,
                  unaveraged.size(), round->sends.size(), round->error.empty() ? "a member was dropped" : round->error);
      std::sort(unaveraged.begin(), unaveraged.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
      co_return Reduced{round->result, std::move(unaveraged), std::move(dropped)};
    }

    /// Serves part_method: adds a sender's chunk to this peer's reduction and answers with the
    /// chunk's aggregate once it is known. A chunk under a member index whose peer id is not
    /// the caller's (`ctx.peer`) is refused (errc::invalid_argument), and costs that member
    /// nothing.
    asio::awaitable<Message> serve(net::CallContext ctx, Message m, const AllReduceSettings& s) {
      const auto& h = m.header;
      if (!h.is_object() || !h.contains("group") || !h["group"].is_string() || !h.contains("sender") ||
          !h["sender"].is_number_unsigned() || !h.contains("chunk") || !h["chunk"].is_number_unsigned() ||
          !h.contains("weight") || !h["weight"].is_number())
        throw Error(errc::bad_header, "avg.part needs 'group' (string), 'sender', 'chunk' (unsigned) and 'weight'");
      // A chunk that does not decode is the sender's fault, like one of the wrong length: the
      // reduction (once known) drops the sender.
      at::Tensor values;
      std::string bad;
      try {
        auto tensors = get_tensors(m, s.limits);
        if (tensors.size() != 1) bad = fmt::format("avg.part carries one tensor, got {}", tensors.size());
        else values = tensors[0];
      } catch (const std::exception& e) {
        bad = fmt::format("malformed chunk: {}", e.what());
      }
      auto op = contribute(h["group"].get<std::string>(), h["sender"].get<std::size_t>(), h["chunk"].get<std::size_t>(),
                           h["weight"].get<double>(), values, std::move(bad), deadline_after(s.registration_timeout),
                           std::move(ctx.peer));
      auto encoded = co_await std::move(op);
      Message reply;
      auto d = encoded.descriptor;
      d["blob"] = reply.add_blob(encoded.payload);
      reply.header = {{"tensors", nlohmann::json::array({std::move(d)})}};
      co_return reply;
    }

    /// Fails every reduction in progress and every later one.
    void close() {
      closed_ = true;
      for (auto& [id, r] : reductions_)
        for (auto& c : r->chunks) c->finished.set();
      reductions_.clear();
      registered_.notify_all();
    }

    /// Reductions this peer holds (for tests and stats).
    [[nodiscard]] std::size_t reductions() const noexcept { return reductions_.size(); }

   private:
    struct Chunk {
      Range range;
      at::Tensor sum;                   // the mean's weighted sum
      std::vector<at::Tensor> values;   // a robust method's chunks, by sender (weight > 0 only)
      std::vector<double> weights;      // ... and their weights
      double weight = 0;
      std::vector<bool> arrived;
      std::size_t count = 0;
      std::optional<Deadline> first_arrival;
      bool done = false;
      std::string error;
      EncodedTensor result;
      detail::Event finished;
    };
    struct Reduction {
      std::string group_id;
      std::size_t senders = 0;  // members of the group (valid sender indices)
      std::size_t my_index = 0;
      std::vector<bool> auxiliary;
      std::vector<std::string> addresses;
      std::vector<std::string> peers;
      std::vector<std::string> dropped;  // why each member was dropped; empty: it was not
      std::vector<std::unique_ptr<Chunk>> chunks;
      Deadline created;
      Deadline deadline;
      Seconds sender_timeout;
      Compression compression = Compression::none;
      AggregationOptions aggregation;
      double max_weight = 0;
      Seconds ban_duration;
      std::shared_ptr<BanList> bans;
    };

    std::shared_ptr<Reduction> add_reduction(const GroupInfo& group, Range part, const AllReduceSettings& s,
                                             const std::vector<std::string>& excluded) {
      // Finished reductions are kept a while for late or duplicate chunks, then dropped.
      const auto now = SteadyClock::now();
      std::erase_if(reductions_, [&](const auto& kv) { return now > kv.second->deadline + s.timeout; });
      auto r = std::make_shared<Reduction>();
      r->group_id = group.group_id;
      r->senders = group.size();
      r->my_index = group.my_index;
      for (const auto& m : group.members) {
        r->auxiliary.push_back(m.auxiliary);
        r->addresses.push_back(m.address);
        r->peers.push_back(m.peer);
      }
      r->dropped = excluded;
      r->created = now;
      r->deadline = deadline_after(s.timeout);
      r->sender_timeout = s.sender_timeout;
      r->compression = s.compression;
      r->aggregation = s.aggregation;
      r->max_weight = s.max_weight;
      r->ban_duration = s.ban_duration;
      r->bans = s.bans;
      for (auto range : chunks_of(part, s.chunk_elements)) {
        auto c = std::make_unique<Chunk>();
        c->range = range;
        c->arrived.assign(group.size(), false);
        if (s.aggregation.method() != Aggregation::mean) {
          c->values.resize(group.size());
          c->weights.assign(group.size(), 0.0);
        }
        r->chunks.push_back(std::move(c));
      }
      reductions_[group.group_id] = r;
      registered_.notify_all();
      return r;
    }

    // The members dropped from a round: by this peer's reduction (when it has one), else as
    // `reasons` says.
    static std::vector<DroppedMember> dropped_members(const GroupInfo& group, const Reduction* mine,
                                                      const std::vector<std::string>& reasons) {
      std::vector<DroppedMember> out;
      for (std::size_t i = 0; i < group.size(); ++i) {
        const std::string* why = mine && !mine->dropped[i].empty() ? &mine->dropped[i] : &reasons[i];
        if (!why->empty()) out.push_back({i, group.members[i].address, group.members[i].peer, *why});
      }
      return out;
    }

    // True while a member that sends, and was not dropped, has not sent chunk `c`.
    static bool waiting(const Reduction& r, const Chunk& c) {
      for (std::size_t i = 0; i < r.senders; ++i)
        if (!r.auxiliary[i] && r.dropped[i].empty() && !c.arrived[i]) return true;
      return false;
    }

    static void finish(Reduction& r, Chunk& c) {
      if (c.done) return;
      c.done = true;
      at::Tensor result;
      if (r.aggregation.method() == Aggregation::mean) {
        if (c.weight > 0) result = c.sum.div_(c.weight);  // in place: the sum is not needed after
      } else {
        std::vector<at::Tensor> rows;
        std::vector<double> weights;
        for (std::size_t i = 0; i < c.values.size(); ++i)
          if (c.values[i].defined()) {
            rows.push_back(c.values[i]);
            weights.push_back(c.weights[i]);
          }
        if (!rows.empty())
          result = aggregate(at::stack(rows), at::tensor(weights, at::kDouble), r.aggregation).to(at::kFloat);
      }
      if (result.defined()) {
        // Encoded once: every sender (and this peer) decodes the same bytes.
        c.result = encode_tensor(result, r.compression);
      } else {
        c.error = c.count == 0 ? "no sender's chunk arrived in time" : "every sender gave weight 0";
      }
      c.sum = at::Tensor();
      c.values.clear();
      c.finished.set();
    }

    // Drops member `sender` from reduction `r`: its later chunks are refused and no chunk waits
    // for it (the chunks it already sent count, as a member's that died while sending); with
    // `ban`, it is banned for the reduction's ban_duration.
    static void drop(Reduction& r, std::size_t sender, const std::string& reason, bool ban) {
      if (!r.dropped[sender].empty()) return;
      r.dropped[sender] = reason;
      const auto& address = r.addresses[sender];
      const auto& peer = r.peers[sender];
      const bool banning = ban && r.bans && sender != r.my_index && !(address.empty() && peer.empty()) &&
                           r.ban_duration > Seconds(0);
      log::warn("averaging", "round {}: dropped member {} ({}){}: {}", r.group_id, sender,
                address.empty() ? "client mode" : address,
                banning ? fmt::format(", banned for {:.0f} s", r.ban_duration.count()) : std::string(), reason);
      if (banning) r.bans->ban(peer, address, r.ban_duration, reason);
      for (auto& c : r.chunks)
        if (!c->done && !waiting(r, *c)) finish(r, *c);
    }

    asio::awaitable<EncodedTensor> contribute(std::string group_id, std::size_t sender, std::size_t chunk, double weight,
                                              at::Tensor values, std::string bad, Deadline wait_until, std::string caller) {
      std::shared_ptr<Reduction> r;
      for (;;) {
        if (closed_) throw Error(errc::shutdown, "the averager is shutting down");
        if (auto it = reductions_.find(group_id); it != reductions_.end()) {
          r = it->second;
          break;
        }
        // A member may send before this peer has heard from the leader that the group formed.
        if (SteadyClock::now() >= wait_until)
          throw Error(errc::invalid_argument, fmt::format("no averaging round '{}' here", group_id));
        co_await registered_.wait(wait_until);
      }
      if (sender >= r->senders)
        throw Error(errc::invalid_argument, fmt::format("sender {} outside a group of {}", sender, r->senders));
      // Only the member itself may send under its index (its id was proven to the leader).
      if (!r->peers[sender].empty() && r->peers[sender] != caller)
        throw Error(errc::invalid_argument, fmt::format("sender {} of round '{}' is peer {}, not the caller {}", sender,
                                                        group_id, r->peers[sender], caller.empty() ? "(unknown)" : caller));
      if (r->auxiliary[sender])
        throw Error(errc::invalid_argument, fmt::format("sender {} is an auxiliary member, which sends nothing", sender));
      if (chunk >= r->chunks.size())
        throw Error(errc::invalid_argument, fmt::format("chunk {} outside this part's {} chunks", chunk, r->chunks.size()));
      if (!r->dropped[sender].empty())
        throw Error(errc::invalid_argument, fmt::format("member {} is dropped from this round: {}", sender, r->dropped[sender]));
      auto& c = *r->chunks[chunk];
      // What a member sends is checked before it counts; a member whose chunk fails is dropped
      // from the round (and banned).
      auto code = errc::bad_tensor;
      if (bad.empty() && !(std::isfinite(weight) && weight >= 0 && weight <= r->max_weight)) {
        bad = fmt::format("weight {} is not a finite number in [0, max_weight = {}]", weight, r->max_weight);
        code = errc::invalid_argument;
      }
      if (bad.empty() && (values.dim() != 1 || values.numel() != c.range.size() || !at::isFloatingType(values.scalar_type())))
        bad = fmt::format("chunk {} should be a float vector of {} elements, got {} of {} elements in {} dimensions", chunk,
                          c.range.size(), c10::toString(values.scalar_type()), values.numel(), values.dim());
      at::Tensor v;
      if (bad.empty()) {
        // Checked as float32, what it is summed in: a float64 1e300 is not finite there.
        v = values.to(at::kFloat);
        if (!all_finite(v)) bad = fmt::format("chunk {} holds non-finite values", chunk);
      }
      if (!bad.empty()) {
        drop(*r, sender, bad, true);
        throw Error(code, fmt::format("{}: member {} is dropped from this round", bad, sender));
      }
      if (c.done) throw Error(errc::timeout, fmt::format("chunk {} arrived after it was averaged without it", chunk));
      if (c.arrived[sender]) throw Error(errc::invalid_argument, fmt::format("chunk {} from sender {} arrived twice", chunk, sender));
      c.arrived[sender] = true;
      ++c.count;
      if (r->aggregation.method() != Aggregation::mean) {
        if (weight > 0) {
          c.values[sender] = v;
          c.weights[sender] = weight;
          c.weight += weight;
        }
      } else if (weight > 0) {
        if (c.sum.defined()) c.sum.add_(v, weight);
        else c.sum = v.mul(weight);
        c.weight += weight;
      } else if (!c.sum.defined()) {
        c.sum = at::zeros({c.range.size()}, at::kFloat);
      }
      if (!c.first_arrival) c.first_arrival = SteadyClock::now();
      if (!waiting(*r, c)) finish(*r, c);
      const auto until = std::min(r->deadline, *c.first_arrival + std::chrono::duration_cast<SteadyClock::duration>(r->sender_timeout));
      while (!c.done && !closed_) {
        if (SteadyClock::now() >= until) {
          finish(*r, c);
          break;
        }
        co_await c.finished.wait(until);
      }
      if (closed_ && !c.done) throw Error(errc::shutdown, "the averager is shutting down");
      if (!c.error.empty()) throw Error(errc::round_failed, fmt::format("chunk {}: {}", chunk, c.error));
      co_return c.result;
    }

    std::shared_ptr<net::Rpc<T>> rpc_;
    std::map<std::string, std::shared_ptr<Reduction>> reductions_;
    ReusedVector results_;  // each round's result vector
    detail::Notifier registered_;
    bool closed_ = false;
  };
};

static_assert(Strategy<Butterfly>);

}  // namespace hive::averaging
