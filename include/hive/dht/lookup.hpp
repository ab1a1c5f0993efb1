#pragma once
/// @file
/// Kademlia's iterative lookup, apart from the peer that runs it: Alpha find requests in flight
/// per key to the nearest peers not yet asked, until the `converge` nearest known peers have
/// all answered (or, for a value that need not be the latest, until one is found); many keys
/// are looked up at once and share requests to the same peer. dht::Node runs it for gets,
/// stores, bootstrap and upkeep; how a peer is asked is the caller's.

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

/// Looks up many keys at once (Kademlia's iterative lookup, batched as hivemind's
/// traverse_dht): each key keeps its own candidates and up to `settings.alpha` requests in
/// flight, and the keys that want the same peer at the same moment share one request to it.
/// `start[i]` is the looking peer's nearest known peers to `keys[i]`. Runs on the calling
/// coroutine's executor, which must be a strand (the state is not locked).
///
/// `ask(peer, keys)` sends one find for `keys` (at most `max_keys_per_request` of them) and
/// returns an awaitable of std::optional<std::vector<FindReply>> (one reply per key, in order;
/// nullopt: the peer failed, for every key). It runs in a coroutine of its own, so it must keep
/// what it uses alive. `skip(peer)` is true for a peer not to ask (banned); `stopped()` true
/// once the looking peer closes, which ends the lookup with an errc::shutdown error. `self` is
/// never a candidate. Returns one LookupResult per key, in order.
template <class Ask, class Skip, class Stopped>
asio::awaitable<std::vector<LookupResult>> iterative_lookup_many(std::vector<Id160> keys,
                                                                 std::vector<std::vector<NodeInfo>> start, Id160 self,
                                                                 LookupSettings settings, Ask ask, Skip skip,
                                                                 Stopped stopped, std::size_t max_keys_per_request = 256) {
  HIVE_CHECK(start.size() == keys.size(), "iterative_lookup_many: {} keys but {} start lists", keys.size(), start.size());
  HIVE_CHECK(max_keys_per_request >= 1, "iterative_lookup_many: max_keys_per_request must be positive");
  struct Key {
    Id160 key;
    std::map<Id160, NodeInfo> candidates;  // distance -> peer
    std::set<Id160> asked, answered;
    std::vector<NodeInfo> lacking;
    std::optional<Record> record;
    std::size_t in_flight = 0;
    bool done = false;
  };
  struct State {
    std::vector<Key> keys;
    std::set<Id160> failed;  // a peer that failed once is not asked again for any key
    std::size_t in_flight = 0;
    hive::detail::Notifier progress;
  };
  auto state = std::make_shared<State>();
  state->keys.resize(keys.size());
  for (std::size_t i = 0; i < keys.size(); ++i) {
    state->keys[i].key = keys[i];
    for (const auto& n : start[i]) state->keys[i].candidates.emplace(n.id ^ keys[i], n);
  }
  const auto executor = co_await asio::this_coro::executor;
  for (;;) {
    if (stopped()) throw Error(errc::shutdown, "dht peer is closed");
    // Each open key picks the unasked among its `converge` nearest candidates that did not
    // fail; the picks are grouped by peer.
    std::map<Id160, std::pair<NodeInfo, std::vector<std::size_t>>> batches;
    bool open = false;
    for (std::size_t i = 0; i < state->keys.size(); ++i) {
      Key& k = state->keys[i];
      if (k.done) continue;
      // A value that need not be the latest ends its key's lookup at once, without waiting for
      // requests still in flight (a dead peer would cost its timeout).
      if (settings.want_value && !settings.latest && k.record && k.record->expiration > settings.now) {
        k.done = true;
        continue;
      }
      std::size_t considered = 0;
      bool pending_in_top = false;
      for (auto& [distance, peer] : k.candidates) {
        if (considered >= settings.converge) break;
        if (state->failed.contains(peer.id)) continue;
        ++considered;
        if (k.answered.contains(peer.id)) continue;
        pending_in_top = true;
        if (k.asked.contains(peer.id) || k.in_flight >= settings.alpha) continue;
        if (skip(peer)) {
          state->failed.insert(peer.id);
          continue;
        }
        k.asked.insert(peer.id);
        ++k.in_flight;
        auto& batch = batches[peer.id];
        batch.first = peer;
        batch.second.push_back(i);
      }
      if (!pending_in_top && k.in_flight == 0) k.done = true;
      else open = true;
    }
    for (auto& [id, batch] : batches) {
      for (std::size_t from = 0; from < batch.second.size(); from += max_keys_per_request) {
        std::vector<std::size_t> which(batch.second.begin() + static_cast<std::ptrdiff_t>(from),
                                       batch.second.begin() + static_cast<std::ptrdiff_t>(
                                                                  std::min(batch.second.size(), from + max_keys_per_request)));
        std::vector<Id160> asked_keys;
        asked_keys.reserve(which.size());
        for (auto i : which) asked_keys.push_back(state->keys[i].key);
        ++state->in_flight;
        asio::co_spawn(
            executor,
            [state, ask, peer = batch.first, which = std::move(which), asked_keys = std::move(asked_keys), self,
             now = settings.now]() -> asio::awaitable<void> {
              auto op = ask(peer, asked_keys);  // a named local: GCC 12 mishandles temporaries in co_await
              auto replies = co_await std::move(op);
              --state->in_flight;
              const bool answered = replies && replies->size() == which.size();
              if (!answered) state->failed.insert(peer.id);
              for (std::size_t j = 0; j < which.size(); ++j) {
                Key& k = state->keys[which[j]];
                --k.in_flight;
                if (!answered) continue;
                auto& reply = (*replies)[j];
                k.answered.insert(peer.id);
                if (reply.record) detail::merge_record(k.record, *reply.record, now);
                else k.lacking.push_back(peer);
                for (auto& n : reply.peers)
                  if (n.id != self && !state->failed.contains(n.id)) k.candidates.emplace(n.id ^ k.key, n);
              }
              state->progress.notify_all();
            },
            asio::detached);
      }
    }
    if (!open) break;
    if (SteadyClock::now() >= settings.deadline) break;
    if (state->in_flight > 0) co_await state->progress.wait(settings.deadline);
    else if (batches.empty()) break;  // nothing in flight and nothing to ask: every key is settled
  }
  std::vector<LookupResult> results(state->keys.size());
  for (std::size_t i = 0; i < state->keys.size(); ++i) {
    Key& k = state->keys[i];
    LookupResult& result = results[i];
    result.record = std::move(k.record);
    for (auto& [distance, peer] : k.candidates)
      if (k.answered.contains(peer.id)) result.nearest.push_back(peer);
    result.lacking = std::move(k.lacking);
    std::sort(result.lacking.begin(), result.lacking.end(),
              [&](const NodeInfo& a, const NodeInfo& b) { return (a.id ^ k.key) < (b.id ^ k.key); });
  }
  co_return results;
}

}  // namespace hive::dht
