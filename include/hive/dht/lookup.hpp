#pragma once
/// @file
/// Kademlia's iterative lookup, apart from the peer that runs it: Alpha find requests in flight
/// to the nearest peers not yet asked, until the `converge` nearest known peers have all
/// answered (or, for a value that need not be the latest, until one is found). dht::Node runs
/// it for gets, stores, bootstrap and upkeep; how a peer is asked is the caller's.

#include <hive/core/clock.hpp>
#include <hive/core/error.hpp>
#include <hive/core/id.hpp>
#include <hive/detail/asio_compat.hpp>
#include <hive/detail/event.hpp>
#include <hive/dht/protocol.hpp>
#include <hive/dht/routing.hpp>
#include <hive/dht/storage.hpp>

#include <algorithm>
#include <cstddef>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <vector>

namespace hive::dht {

/// A peer's answer to a find: the record it holds for the key, and peers nearer to it.
struct FindReply {
  /// The record, when the peer holds one (from its storage or cache).
  std::optional<Record> record;
  /// Peers the answering peer knows nearest to the key.
  std::vector<NodeInfo> peers;
};

/// What a lookup found.
struct LookupResult {
  /// The freshest unexpired record among the answers (merged as merge_record does).
  std::optional<Record> record;
  /// The peers that answered, nearest to the key first (never the peer that looked).
  std::vector<NodeInfo> nearest;
  /// The peers that answered without a value, nearest first (where a found value is cached).
  std::vector<NodeInfo> lacking;
};

/// How one lookup runs.
struct LookupSettings {
  /// Stop at the first unexpired value unless `latest`.
  bool want_value = false;
  /// Ask until convergence even after a value was found, to return the freshest.
  bool latest = false;
  /// Converged when this many nearest live candidates have answered (Kademlia's K).
  std::size_t converge = 20;
  /// Requests in flight at once (Kademlia's alpha).
  std::size_t alpha = 3;
  /// The lookup ends at this time with what it has.
  Deadline deadline{};
  /// The looking peer's time (seconds since the epoch), for expirations.
  double now = 0;
};

/// Looks `key` up, starting from `start` (the looking peer's nearest known peers), on the
/// calling coroutine's executor, which must be a strand (the state is not locked).
/// `ask(peer)` sends one find and returns an awaitable of std::optional<FindReply> (nullopt:
/// the peer failed); it runs in a coroutine of its own, so it must keep what it uses alive.
/// `skip(peer)` is true for a peer not to ask (banned); `stopped()` true once the looking
/// peer closes, which ends the lookup with an errc::shutdown error. `self` is never a candidate.
template <class Ask, class Skip, class Stopped>
asio::awaitable<LookupResult> iterative_lookup(Id160 key, std::vector<NodeInfo> start, Id160 self,
                                               LookupSettings settings, Ask ask, Skip skip, Stopped stopped) {
  struct State {
    std::map<Id160, NodeInfo> candidates;  // distance -> peer
    std::set<Id160> asked, answered, failed;
    std::vector<NodeInfo> lacking;
    std::optional<Record> record;
    std::size_t in_flight = 0;
    hive::detail::Notifier progress;
  };
  auto state = std::make_shared<State>();
  for (const auto& n : start) state->candidates.emplace(n.id ^ key, n);
  const auto executor = co_await asio::this_coro::executor;
  for (;;) {
    if (stopped()) throw Error(errc::shutdown, "dht peer is closed");
    if (settings.want_value && !settings.latest && state->record && state->record->expiration > settings.now) break;
    // The `converge` nearest candidates that did not fail; ask the unasked among them.
    std::size_t considered = 0;
    bool pending_in_top = false;
    for (auto& [distance, peer] : state->candidates) {
      if (considered >= settings.converge) break;
      if (state->failed.contains(peer.id)) continue;
      ++considered;
      if (state->answered.contains(peer.id)) continue;
      pending_in_top = true;
      if (state->asked.contains(peer.id) || state->in_flight >= settings.alpha) continue;
      if (skip(peer)) {
        state->failed.insert(peer.id);
        continue;
      }
      state->asked.insert(peer.id);
      ++state->in_flight;
      asio::co_spawn(
          executor,
          [state, ask, peer = peer, key, self, now = settings.now]() -> asio::awaitable<void> {
            auto op = ask(peer);  // a named local: GCC 12 mishandles temporaries in co_await
            auto reply = co_await std::move(op);
            --state->in_flight;
            if (!reply) {
              state->failed.insert(peer.id);
            } else {
              state->answered.insert(peer.id);
              if (reply->record) detail::merge_record(state->record, *reply->record, now);
              else state->lacking.push_back(peer);
              for (auto& n : reply->peers)
                if (n.id != self && !state->failed.contains(n.id)) state->candidates.emplace(n.id ^ key, n);
            }
            state->progress.notify_all();
          },
          asio::detached);
    }
    if (!pending_in_top && state->in_flight == 0) break;
    if (SteadyClock::now() >= settings.deadline) break;
    if (state->in_flight > 0) co_await state->progress.wait(settings.deadline);
  }
  LookupResult result;
  result.record = state->record;
  for (auto& [distance, peer] : state->candidates)
    if (state->answered.contains(peer.id)) result.nearest.push_back(peer);
  result.lacking = state->lacking;
  std::sort(result.lacking.begin(), result.lacking.end(),
            [&](const NodeInfo& a, const NodeInfo& b) { return (a.id ^ key) < (b.id ^ key); });
  co_return result;
}

}  // namespace hive::dht
