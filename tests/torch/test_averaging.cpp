// Decentralized averaging: matchmaking through the DHT, the butterfly and Gloo all-reduce
// strategies (exact, weighted, compressed), members that die mid-round, state transfer, and
// training on Fashion-MNIST.
#include "../../examples/common/fashion_mnist.hpp"
#include "../../examples/common/seeded.hpp"
#include "../common/averaging_swarm.hpp"
#include "../common/wait.hpp"

#include <hive/averaging/gloo.hpp>
#include <hive/trainer.hpp>

#include <doctest/doctest.h>

#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/activation.h>
#include <torch/optim/sgd.h>

#include <cmath>
#include <future>
#include <latch>
#include <thread>

using namespace hive;
using namespace std::chrono_literals;
using averaging::AveragerOptions;
using averaging::StepResult;
using Averager = averaging::DecentralizedAverager<>;
struct GlooPolicies : DefaultPolicies {
  using strategy = averaging::Gloo;
};
using GlooAverager = AveragerFor<GlooPolicies>;

using test::fast;
using test::swarm;

namespace {

/// Runs one step on every averager at once, with weights `weights` (1 when empty).
template <class A>
std::vector<StepResult> step_all(std::vector<std::unique_ptr<A>>& averagers, std::vector<double> weights = {}) {
  std::vector<std::future<StepResult>> futures;
  for (std::size_t i = 0; i < averagers.size(); ++i)
    futures.push_back(averagers[i]->async_step(weights.empty() ? 1.0 : weights[i], nlohmann::json{{"peer", i}}));
  std::vector<StepResult> out;
  for (auto& f : futures) out.push_back(f.get());
  return out;
}

/// Per peer: two tensors of different dtypes and shapes, filled from a seed.
std::vector<at::Tensor> peer_tensors(int seed) {
  at::manual_seed(seed);
  return {at::randn({3, 50}), at::randn({1000}).to(at::kDouble), at::randn({})};
}

double max_abs_diff(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, (a[i].to(at::kDouble) - b[i].to(at::kDouble)).abs().max().item<double>());
  return worst;
}

/// The weighted mean of every peer's tensors (in double).
std::vector<at::Tensor> expected_mean(const std::vector<std::vector<at::Tensor>>& inputs, const std::vector<double>& w) {
  std::vector<at::Tensor> out;
  double total = 0;
  for (double x : w) total += x;
  for (std::size_t t = 0; t < inputs[0].size(); ++t) {
    auto sum = at::zeros_like(inputs[0][t], at::kDouble);
    for (std::size_t p = 0; p < inputs.size(); ++p) sum += inputs[p][t].to(at::kDouble) * w[p];
    out.push_back(sum / total);
  }
  return out;
}

std::vector<at::Tensor> clones(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.clone());
  return out;
}

/// Averagers of type A on the given DHT peers, peer i holding peer_tensors(first_seed + i),
/// with a copy of what each held before.
template <class A = Averager>
struct Peers {
  std::vector<std::unique_ptr<DHT>> dhts;
  std::vector<std::vector<at::Tensor>> tensors, before;
  std::vector<std::unique_ptr<A>> averagers;

  Peers(std::vector<std::unique_ptr<DHT>> peers, int first_seed, const AveragerOptions& options) : dhts(std::move(peers)) {
    for (std::size_t i = 0; i < dhts.size(); ++i) {
      tensors.push_back(peer_tensors(first_seed + static_cast<int>(i)));
      before.push_back(clones(tensors.back()));
      averagers.push_back(std::make_unique<A>(*dhts[i], tensors.back(), options));
    }
  }
};

/// Checks that every step averaged in a group of `group_size` and left `mean` behind.
template <class A>
void check_averaged(const std::vector<StepResult>& results, const Peers<A>& peers, const std::vector<at::Tensor>& mean,
                    std::size_t group_size, double tolerance = 1e-6) {
  for (std::size_t i = 0; i < results.size(); ++i) {
    INFO("peer ", i, ": ", results[i].error);
    REQUIRE(results[i].ok);
    CHECK(results[i].group_size == group_size);
    CHECK(max_abs_diff(peers.tensors[i], mean) <= tolerance);
  }
}

/// Averages `n` peers' tensors once with averager type A and checks that every peer holds the
/// weighted mean.
template <class A = Averager>
void check_group_average(std::size_t n, std::vector<double> weights, Compression compression, double tolerance) {
  Peers<A> peers(swarm(n), 0, fast("avg" + std::to_string(n), n).compression(compression).part_size_bytes(1024));
  if (weights.empty()) weights.assign(n, 1.0);
  auto results = step_all(peers.averagers, weights);
  check_averaged(results, peers, expected_mean(peers.before, weights), n, tolerance);
  for (std::size_t i = 0; i < n; ++i) {
    CHECK(results[i].gathered.size() == n);
    // Every member decodes the same encoded averages (butterfly), or Gloo's ring leaves the
    // same sum on every rank: the peers end bit-for-bit equal.
    for (std::size_t t = 0; t < peers.tensors[i].size(); ++t) CHECK(at::equal(peers.tensors[i][t], peers.tensors[0][t]));
    CHECK((peers.tensors[i][1].scalar_type() == at::kDouble));
  }
}

}  // namespace

TEST_CASE("averaging: peers whose clocks disagree by up to 3 s (each way) still average in one group") {
  // Injected clocks, not sleeps: each peer's DHT reads and writes absolute times shifted.
  const std::vector<double> offsets{-3.0, -1.0, 1.0, 3.0};
  std::vector<std::unique_ptr<DHT>> dhts;
  for (std::size_t i = 0; i < offsets.size(); ++i) {
    auto options = DHTOptions().listen_on("127.0.0.1:0").node(dht::NodeOptions().clock_offset(Seconds(offsets[i])));
    if (i > 0) options.initial_peers(dhts[0]->visible_addresses());
    dhts.push_back(std::make_unique<DHT>(options));
  }
  // A record stored by the peer that runs 3 s behind is read by the one 3 s ahead.
  CHECK(dhts[0]->store("skewed", "value", dhts[0]->node()->now() + 10));
  auto got = dhts[3]->get("skewed", true);
  REQUIRE(got);
  CHECK(got->value->value == "value");

  Peers<> peers(std::move(dhts), 0, fast("skew", 4).matchmaking_time(Seconds(2)));
  auto results = step_all(peers.averagers);
  check_averaged(results, peers, expected_mean(peers.before, {1, 1, 1, 1}), 4);
}

TEST_CASE("averaging: group keys, parts and chunks") {
  averaging::GroupKeys keys("run", "0110");
  CHECK(keys.group_key() == "run.0b0110");
  keys.update(3, 4);  // index 3 of 4 shifts in "11"
  CHECK(keys.bits() == "1011");
  keys.update(0, 3);
  CHECK(keys.bits() == "1100");
  CHECK_THROWS_AS(averaging::GroupKeys("", ""), InvalidArgument);
  CHECK_THROWS_AS(averaging::GroupKeys("run", "012"), InvalidArgument);
  auto parts = averaging::split_evenly(10, 3);
  CHECK(parts[0].size() == 4);
  CHECK(parts[2].end == 10);
  auto chunks = averaging::chunks_of({4, 14}, 4);
  REQUIRE(chunks.size() == 3);
  CHECK(chunks[2].begin == 12);
  CHECK(chunks[2].end == 14);
  CHECK(averaging::chunks_of({5, 5}, 4).size() == 1);  // an empty part still has one chunk
}

TEST_CASE("averaging: two peers end with equal parameters, the mean") { check_group_average(2, {}, Compression::none, 1e-6); }

TEST_CASE("averaging: eight peers end with equal parameters, the mean") { check_group_average(8, {}, Compression::none, 1e-6); }

TEST_CASE("averaging: weighted averaging is exact") {
  check_group_average(3, {1.0, 2.0, 5.0}, Compression::none, 1e-6);
}

TEST_CASE("averaging: float16 and 8-bit compression stay within their error bounds") {
  // Values are N(0,1): float16 loses at most 2^-11 relative per hop (two hops: sent, answered);
  // uniform8 at most half a step of (max - min) / 255 per hop.
  SUBCASE("float16") { check_group_average(4, {}, Compression::float16, 2 * 5.0 * std::pow(2.0, -11)); }
  SUBCASE("uniform8") { check_group_average(4, {}, Compression::uniform8, 2 * 0.5 * 10.0 / 255); }
  // quantile8's buckets are narrow where values are dense and wide in the tails: its bound is
  // the widest bucket, loose, but the members still end bit-for-bit equal.
  SUBCASE("quantile8") { check_group_average(4, {}, Compression::quantile8, 0.5); }
}

TEST_CASE("averaging: the Gloo strategy averages to the mean, weighted, and in float16 within its bound") {
  check_group_average<GlooAverager>(4, {}, Compression::none, 1e-6);
  check_group_average<GlooAverager>(3, {1, 2, 5}, Compression::none, 1e-6);
  check_group_average<GlooAverager>(2, {}, Compression::float16, 5e-3);
}

TEST_CASE("averaging: the Gloo strategy refuses a client-mode member and codecs it does not have") {
  {
    Peers<GlooAverager> peers(swarm(1), 40, fast("gloo_client", 2));
    DHT client_dht(DHTOptions().client_mode(true).initial_peers(peers.dhts[0]->visible_addresses()));
    auto tensors = peer_tensors(41);
    GlooAverager client(client_dht, tensors, fast("gloo_client", 2));
    auto fa = peers.averagers[0]->async_step(1.0);
    auto fb = client.async_step(1.0);
    auto ra = fa.get(), rb = fb.get();
    INFO(ra.error, " / ", rb.error);
    CHECK_FALSE(ra.ok);
    CHECK_FALSE(rb.ok);
    CHECK(ra.error.find("client mode") != std::string::npos);
    CHECK(max_abs_diff(peers.tensors[0], peers.before[0]) == 0);
  }
  {
    Peers<GlooAverager> peers(swarm(2), 42, fast("gloo_uniform8", 2).compression(Compression::uniform8));
    for (const auto& r : step_all(peers.averagers)) {
      CHECK_FALSE(r.ok);
      CHECK(r.error.find("not supported") != std::string::npos);
    }
    CHECK(max_abs_diff(peers.tensors[0], peers.before[0]) == 0);
  }
}

TEST_CASE("averaging: no partner means no change and a clear reason") {
  auto dhts = swarm(1);
  auto tensors = peer_tensors(1);
  const auto before = clones(tensors);
  Averager averager(*dhts[0], tensors, fast("alone", 4).matchmaking_time(Seconds(0.5)));
  auto r = averager.step();
  CHECK_FALSE(r.ok);
  CHECK(r.error.find("no group found") != std::string::npos);
  CHECK(max_abs_diff(tensors, before) == 0);
  CHECK_THROWS_AS(Averager(*dhts[0], tensors, fast("", 4)), InvalidArgument);
  CHECK_THROWS_AS(Averager(*dhts[0], tensors, fast("x", 4).min_group_size(5)), InvalidArgument);
  CHECK_THROWS_AS(averager.step(-1.0), InvalidArgument);
  // One averager per prefix on a DHT peer; once it stops, another may take the prefix.
  CHECK_THROWS_AS(Averager(*dhts[0], tensors, fast("alone", 4)), InvalidArgument);
  averager.shutdown();
  CHECK_FALSE(averager.step().ok);
  Averager replacement(*dhts[0], tensors, fast("alone", 4));
  CHECK(replacement.group_key() == "alone.0b");
}

TEST_CASE("averaging: a client-mode peer sends and receives but reduces nothing") {
  auto dhts = swarm(2);
  dhts.push_back(std::make_unique<DHT>(DHTOptions().client_mode(true).initial_peers(dhts[0]->visible_addresses())));
  Peers<> peers(std::move(dhts), 10, fast("client", 3));
  CHECK(peers.averagers[2]->client_mode());
  auto results = step_all(peers.averagers);
  check_averaged(results, peers, expected_mean(peers.before, {1, 1, 1}), 3);
}

namespace {

/// A hand-written member: joins the group of the best-ranked peer under `key`, then dies in a
/// phase the test picks (closes its connections), or, in client mode, never sends a chunk.
struct FakeMember {
  net::Runtime runtime{1};
  std::shared_ptr<net::Rpc<net::Tcp>> rpc = net::Rpc<net::Tcp>::create(runtime.executor());
  std::string address;
  /// The group it joined (members and its index), once join() returned.
  averaging::GroupInfo group;
  /// Set (on the io thread) when a chunk reached this member as a reducer.
  std::atomic<bool> reducing{false};

  explicit FakeMember(bool client_mode) {
    if (!client_mode) address = rpc->listen("127.0.0.1:0");
  }
  ~FakeMember() {
    rpc->close();
    runtime.stop();
  }

  /// Serves the run's part method by holding every chunk without an answer (a reducer that
  /// stalls; it dies when the test closes `rpc`).
  void hold_chunks(const std::string& prefix) {
    rpc->add_handler(averaging::method_for(averaging::part_method, prefix),
                     [this](net::CallContext, Message) -> asio::awaitable<Message> {
                       reducing = true;
                       asio::steady_timer timer(co_await asio::this_coro::executor, std::chrono::seconds(30));
                       auto [ec] = co_await timer.async_wait(hive::detail::as_tuple_awaitable);
                       (void)ec;
                       throw Error(errc::timeout, "held");
                     });
  }

  /// Serves the run's part method by answering every chunk at once with NaN of its size (a
  /// reducer that answers garbage).
  void answer_chunks_with_nan(const std::string& prefix) {
    rpc->add_handler(averaging::method_for(averaging::part_method, prefix),
                     [this](net::CallContext, Message m) -> asio::awaitable<Message> {
                       reducing = true;
                       const auto chunk = get_tensors(m).at(0);
                       Message reply;
                       add_tensors(reply, {at::full_like(chunk, NAN)});
                       co_return reply;
                     });
  }

  /// Joins the best-ranked peer under `key` (read from `dht`), retrying refusals (a peer may
  /// still be asking another) for a bounded time; returns the group's size, 0 when not accepted.
  std::size_t join(DHT& dht, const std::string& key, const std::string& schema) {
    const auto prefix = key.substr(0, key.rfind(".0b"));
    std::size_t size = 0;
    test::wait_for([&] {
      auto record = dht.get(key, true);
      if (!record) return false;
      std::string leader;
      double best = 1e300;
      for (const auto& [subkey, v] : record->dictionary)
        if (v.value.contains("deadline") && v.value["deadline"].get<double>() < best) {
          best = v.value["deadline"].get<double>();
          leader = dht::split_owned(std::get<std::string>(subkey)).value().second;
        }
      if (leader.empty()) return false;
      Message request;
      request.header = {{"key", key}, {"schema", schema}, {"compression", "none"}, {"address", address},
                        {"client_mode", address.empty()}};
      auto reply = rpc->call(leader, averaging::method_for(averaging::join_method, prefix), std::move(request), Seconds(10));
      if (!reply.header.value("accepted", false)) return false;
      group.group_id = reply.header["group_id"].get<std::string>();
      group.members = reply.header["members"].get<std::vector<averaging::Member>>();
      group.my_index = reply.header["index"].get<std::size_t>();
      size = group.size();
      return true;
    });
    return size;
  }

  /// Sends chunk 0 of `flat`'s part of member `reducer` (a group of one chunk per part) with
  /// `weight`, as member `sender` (itself by default), and gives up on the answer after
  /// `wait`; returns the error the reducer answered with (empty when it answered with an
  /// average, or not in time).
  std::string send_part(const std::string& prefix, const at::Tensor& flat, std::size_t reducer, double weight = 1.0,
                        Seconds wait = Seconds(0.3), std::optional<std::size_t> sender = std::nullopt) {
    const auto parts = averaging::partition(group, flat.numel());
    const auto reducers = group.reducers();
    const auto p = static_cast<std::size_t>(std::find(reducers.begin(), reducers.end(), reducer) - reducers.begin());
    Message m;
    m.header = {{"group", group.group_id}, {"sender", sender.value_or(group.my_index)}, {"chunk", 0}, {"weight", weight},
                {"compression", "none"}};
    add_tensors(m, {flat.slice(0, parts[p].begin, parts[p].end).clone()});
    try {
      rpc->call(group.members[reducer].address, averaging::method_for(averaging::part_method, prefix), std::move(m), wait);
    } catch (const RemoteError& e) {
      return e.what();
    } catch (const std::exception&) {  // the answer comes after all senders: not waited for
    }
    return {};
  }
};

/// How a FakeMember fails a round of three real peers and itself.
enum class Death { before_sending, while_sending, while_reducing };

/// Three real peers and a FakeMember that dies in phase `death`: the survivors finish the
/// round; the dead member's part keeps each survivor's values (and is named in unaveraged);
/// every other part holds the mean of the members that sent it. Then a round without it.
void check_survivors(Death death, const std::string& prefix) {
  Peers<> peers(swarm(3), 20, fast(prefix, 4));
  auto fake = std::make_unique<FakeMember>(false);
  const auto fake_flat = averaging::flatten_tensors(peer_tensors(99));
  if (death == Death::while_reducing) fake->hold_chunks(prefix);
  auto joined = std::async(std::launch::async, [&] {
    auto n = fake->join(*peers.dhts[0], peers.averagers[0]->group_key(), averaging::schema_hash(peers.tensors[0]));
    if (death == Death::while_sending) fake->send_part(prefix, fake_flat, 0);  // to the leader only
    if (death == Death::while_reducing) test::wait_for([&] { return fake->reducing.load(); });
    fake->rpc->close();
    return n;
  });
  auto results = step_all(peers.averagers);
  REQUIRE(joined.get() == 4);
  const auto& group = fake->group;
  const auto flat_size = averaging::flatten_tensors(peers.before[0]).numel();
  const auto parts = averaging::partition(group, flat_size);
  const auto dead = parts[group.my_index];  // every member reduces: part index = member index
  std::vector<at::Tensor> before;
  for (const auto& b : peers.before) before.push_back(averaging::flatten_tensors(b).to(at::kDouble));
  const auto survivors_mean = (before[0] + before[1] + before[2]) / 3;
  const auto with_fake = (before[0] + before[1] + before[2] + fake_flat.to(at::kDouble)) / 4;
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("peer ", i, ": ", results[i].error);
    REQUIRE(results[i].ok);
    CHECK(results[i].group_size == 4);
    REQUIRE(results[i].unaveraged.size() == 1);
    CHECK(results[i].unaveraged[0].begin == dead.begin);
    CHECK(results[i].unaveraged[0].end == dead.end);
    const auto after = averaging::flatten_tensors(peers.tensors[i]).to(at::kDouble);
    for (std::size_t p = 0; p < parts.size(); ++p) {
      INFO("part ", p);
      const auto got = after.slice(0, parts[p].begin, parts[p].end);
      if (p == group.my_index) {
        CHECK(at::equal(got, before[i].slice(0, parts[p].begin, parts[p].end)));  // its own values, untouched
      } else {
        const auto& mean = death == Death::while_sending && p == 0 ? with_fake : survivors_mean;
        CHECK((got - mean.slice(0, parts[p].begin, parts[p].end)).abs().max().item<double>() <= 1e-5);
      }
    }
  }
  // Without it, the survivors average everything.
  for (std::size_t i = 0; i < 3; ++i) peers.before[i] = clones(peers.tensors[i]);
  auto again = step_all(peers.averagers);
  check_averaged(again, peers, expected_mean(peers.before, {1, 1, 1}), 3);
  for (const auto& r : again) CHECK(r.complete());
}

}  // namespace

TEST_CASE("averaging: a member that dies before sending: the others average the rest, its part keeps local values") {
  check_survivors(Death::before_sending, "dies_before");
}

TEST_CASE("averaging: a member that dies while sending: its chunk counts where it arrived, its part keeps local values") {
  check_survivors(Death::while_sending, "dies_sending");
}

TEST_CASE("averaging: a member that dies while reducing: its part keeps local values, the rest is averaged") {
  check_survivors(Death::while_reducing, "dies_reducing");
}

TEST_CASE("averaging: a reducer that answers NaN is dropped and banned, and its part keeps each peer's values bit for bit") {
  const std::string prefix = "answers_nan";
  Peers<> peers(swarm(3), 20, fast(prefix, 4).ban_duration(Seconds(600)));
  auto fake = std::make_unique<FakeMember>(false);
  fake->answer_chunks_with_nan(prefix);
  // It joins and answers every chunk sent to it, but sends none of its own.
  auto joined = std::async(std::launch::async, [&] {
    return fake->join(*peers.dhts[0], peers.averagers[0]->group_key(), averaging::schema_hash(peers.tensors[0]));
  });
  auto results = step_all(peers.averagers);
  REQUIRE(joined.get() == 4);
  CHECK(fake->reducing.load());
  const auto& group = fake->group;
  const auto flat_size = averaging::flatten_tensors(peers.before[0]).numel();
  const auto parts = averaging::partition(group, flat_size);
  std::vector<at::Tensor> before;
  for (const auto& b : peers.before) before.push_back(averaging::flatten_tensors(b));
  const auto honest_mean = (before[0].to(at::kDouble) + before[1].to(at::kDouble) + before[2].to(at::kDouble)) / 3;
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("peer ", i, ": ", results[i].error);
    REQUIRE(results[i].ok);
    REQUIRE(results[i].dropped.size() == 1);
    CHECK(results[i].dropped[0].index == group.my_index);
    CHECK(results[i].dropped[0].reason.find("non-finite") != std::string::npos);
    REQUIRE(results[i].unaveraged.size() == 1);
    CHECK(results[i].unaveraged[0].begin == parts[group.my_index].begin);
    CHECK(results[i].unaveraged[0].end == parts[group.my_index].end);
    const auto after = averaging::flatten_tensors(peers.tensors[i]);
    for (std::size_t p = 0; p < parts.size(); ++p) {
      INFO("part ", p);
      const auto got = after.slice(0, parts[p].begin, parts[p].end);
      if (p == group.my_index)
        CHECK(at::equal(got, before[i].slice(0, parts[p].begin, parts[p].end)));  // not a NaN left
      else
        CHECK((got.to(at::kDouble) - honest_mean.slice(0, parts[p].begin, parts[p].end)).abs().max().item<double>() <= 1e-5);
    }
    const auto bans = peers.averagers[i]->banned_peers();
    REQUIRE(bans.size() == 1);
    CHECK(bans[0].peer == fake->rpc->peer_id());
  }
}

TEST_CASE("averaging: copy_and_check_finite copies every value and finds every NaN and infinity, in float32 and others") {
  // Float32 vectors take the blocked path: a bad value in the first block, the last (partial)
  // one, or none; the copy is complete either way.
  for (const std::int64_t n : {1, 4095, 4096, 4097, 3 * 4096 + 5}) {
    for (const std::int64_t at_index : {std::int64_t{-1}, std::int64_t{0}, n / 2, n - 1}) {
      for (const float bad : {NAN, INFINITY, -INFINITY}) {
        CAPTURE(n);
        CAPTURE(at_index);
        auto src = at::randn({n});
        if (at_index >= 0) src[at_index] = bad;
        auto dst = at::full({n}, 7.f);
        CHECK(averaging::copy_and_check_finite(dst, src) == (at_index < 0));
        CHECK(at::equal(dst.isnan(), src.isnan()));
        CHECK(at::equal(dst.nan_to_num(0), src.nan_to_num(0)));
      }
    }
  }
  // Other dtypes and layouts are copied with copy_ and checked as dst's dtype: a float64 1e300
  // is infinite as float32.
  auto dst = at::zeros({4});
  CHECK(averaging::copy_and_check_finite(dst, at::tensor({1.0, 2.0, 3.0, 4.0}, at::kDouble)));
  CHECK(at::equal(dst, at::tensor({1.f, 2.f, 3.f, 4.f})));
  CHECK_FALSE(averaging::copy_and_check_finite(dst, at::tensor({1.0, 1e300, 3.0, 4.0}, at::kDouble)));
  CHECK(averaging::copy_and_check_finite(dst, at::arange(8, at::kFloat).reshape({4, 2}).t().select(0, 1)));
  CHECK(at::equal(dst, at::tensor({1.f, 3.f, 5.f, 7.f})));
  CHECK(averaging::copy_and_check_finite(dst, at::arange(4, at::kInt)));
  // A size mismatch or a destination that is not contiguous is refused.
  CHECK_THROWS_AS((void)averaging::copy_and_check_finite(dst, at::zeros({5})), InvalidArgument);
  CHECK_THROWS_AS((void)averaging::copy_and_check_finite(at::zeros({4, 2}).t().select(0, 0), at::zeros({4})),
                  InvalidArgument);
}

TEST_CASE("averaging: a Gloo round whose member never comes fails on the others by its timeout, and the next round works") {
  Peers<GlooAverager> peers(swarm(3), 25, fast("gloo_dies", 4).allreduce_timeout(Seconds(5)));
  auto fake = std::make_unique<FakeMember>(false);
  auto joined = std::async(std::launch::async, [&] {
    auto n = fake->join(*peers.dhts[0], peers.averagers[0]->group_key(), averaging::schema_hash(peers.tensors[0]));
    fake->rpc->close();  // dies as the round starts: it never opens its Gloo side
    return n;
  });
  auto results = step_all(peers.averagers);  // bounded by matchmaking_time + allreduce_timeout
  REQUIRE(joined.get() == 4);
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("peer ", i, ": ", results[i].error);
    CHECK(results[i].group_size == 4);
    CHECK_FALSE(results[i].ok);
    CHECK(max_abs_diff(peers.tensors[i], peers.before[i]) == 0);
  }
  check_averaged(step_all(peers.averagers), peers, expected_mean(peers.before, {1, 1, 1}), 3);
}

TEST_CASE("averaging: a member that stalls without sending is left out after sender_timeout") {
  Peers<> peers(swarm(3), 30, fast("stalls", 4));
  FakeMember fake(true);  // client mode: it owns no part, so the others can finish without it
  auto joined = std::async(std::launch::async, [&] {
    return fake.join(*peers.dhts[0], peers.averagers[0]->group_key(), averaging::schema_hash(peers.tensors[0]));
  });
  auto results = step_all(peers.averagers);
  REQUIRE(joined.get() == 4);
  check_averaged(results, peers, expected_mean(peers.before, {1, 1, 1}), 4);
}

TEST_CASE("averaging: a part request with bad fields gets an error and the peer keeps serving") {
  auto dhts = swarm(2);
  auto tensors = peer_tensors(1);
  Averager averager(*dhts[0], tensors, fast("bad", 2));
  net::Runtime runtime(1);
  auto rpc = net::Rpc<net::Tcp>::create(runtime.executor());
  const auto address = dhts[0]->visible_addresses().at(0);
  // Each is refused by the averager's handler (served under the run's prefix), not as an
  // unknown method.
  auto refused = [&](const std::string& method, Message m, Seconds timeout) {
    try {
      rpc->call(address, method, std::move(m), timeout);
      FAIL("no error for ", method);
    } catch (const RemoteError& e) {
      INFO(method, ": ", e.what());
      CHECK(std::string(e.what()).find("unknown method") == std::string::npos);
    }
  };
  Message no_fields;
  no_fields.header = nlohmann::json::object();
  refused("avg.part:bad", no_fields, Seconds(5));
  Message unknown_group;
  unknown_group.header = {{"group", "nope"}, {"sender", 0}, {"chunk", 0}, {"weight", 1.0}};
  add_tensors(unknown_group, {at::ones({4})});
  refused("avg.part:bad", unknown_group, Seconds(10));
  Message bad_join;
  bad_join.header = {{"key", 3}};
  refused("avg.join:bad", bad_join, Seconds(5));
  Message state;
  state.header = {{"offset", 0}};
  refused("avg.state:bad", state, Seconds(5));  // shares no state
  rpc->close();
  // Still averaging.
  auto other = peer_tensors(2);
  Averager second(*dhts[1], other, fast("bad", 2));
  auto a = averager.async_step();
  auto b = second.step();
  CHECK(a.get().ok);
  CHECK(b.ok);
}

namespace {

torch::nn::Sequential small_model(int seed) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(torch::nn::Linear(784, 64), torch::nn::ReLU(), torch::nn::Linear(64, 10));
}

double accuracy(torch::nn::Sequential& model, const examples::Dataset& test) {
  torch::NoGradGuard no_grad;
  auto predicted = model->forward(test.images).argmax(1);
  return predicted.eq(test.labels).to(at::kFloat).mean().item<double>() * 100;
}

}  // namespace

TEST_CASE("averaging: a StateSharing of its own shares a state in parts and a peer downloads it, no averager needed") {
  auto dhts = swarm(2);
  using Sharing = averaging::StateSharing<net::Tcp, dht::Kademlia<>>;
  // 16-byte parts: the 40-byte tensor goes alone, the two small ones together.
  auto giver = std::make_shared<Sharing>(dhts[0]->node(), "solo.state", dhts[0]->visible_addresses().front(),
                                         averaging::StateSharingOptions().part_bytes(16));
  auto taker = std::make_shared<Sharing>(dhts[1]->node(), "solo.state", dhts[1]->visible_addresses().front());
  const auto& rpc = dhts[0]->node()->rpc();
  rpc->add_handler(std::string(averaging::state_method),
                   [giver](net::CallContext, Message m) { return giver->serve(std::move(m)); });
  CHECK(taker->async_download(Seconds(5)).get() == std::nullopt);  // nobody shares yet
  int calls = 0;
  giver->set_provider(
      [&] {
        ++calls;
        return averaging::State{{{"step", 7}}, {at::arange(10, at::kFloat), at::ones({2}), at::zeros({1})}};
      },
      2.0);
  std::optional<averaging::State> got;
  CHECK(test::wait_for([&] { return (got = taker->async_download(Seconds(5)).get()).has_value(); }));
  REQUIRE(got);
  CHECK(got->metadata.at("step") == 7);
  REQUIRE(got->tensors.size() == 3);
  CHECK(at::equal(got->tensors[0], at::arange(10, at::kFloat)));
  CHECK(at::equal(got->tensors[1], at::ones({2})));
  CHECK(at::equal(got->tensors[2], at::zeros({1})));
  CHECK(calls == 1);  // one snapshot served every part
  // A peer that shares is not offered its own state.
  auto self = asio::co_spawn(rpc->get_executor(), giver->sharing_peers(), asio::use_future).get();
  CHECK(self.empty());
  hive::detail::run_blocking_on(rpc->get_executor(), [&] {
    giver->close();
    rpc->remove_handler(std::string(averaging::state_method));
  });
  CHECK(taker->async_download(Seconds(5)).get() == std::nullopt);
}

TEST_CASE("averaging: load_state_from_peers yields identical parameters, optimizer state and step") {
  auto dhts = swarm(2);
  auto data = examples::load_fashion_mnist(true, 512);
  auto a_model = small_model(1);
  torch::optim::SGD a_sgd(a_model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  auto options = optim::DecentralizedOptions().prefix("state").target_group_size(2);
  options.averager().matchmaking_time(Seconds(0.3));
  optim::DecentralizedOptimizer a_opt(a_sgd, *dhts[0], options);
  for (int i = 0; i < 16; ++i) {
    a_opt.zero_grad();
    auto x = data.images.slice(0, i * 32, (i + 1) * 32);
    auto y = data.labels.slice(0, i * 32, (i + 1) * 32);
    torch::nn::functional::cross_entropy(a_model->forward(x), y).backward();
    a_opt.step();
  }
  auto b_model = small_model(2);
  torch::optim::SGD b_sgd(b_model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  optim::DecentralizedOptimizer b_opt(b_sgd, *dhts[1], options);
  // A's announcement is stored in the background when it starts sharing.
  REQUIRE(test::wait_for([&] { return b_opt.load_state_from_peers(Seconds(10)); }));
  CHECK(b_opt.local_step() == 16);
  const auto a_params = a_model->parameters();
  const auto b_params = b_model->parameters();
  REQUIRE(a_params.size() == b_params.size());
  for (std::size_t i = 0; i < a_params.size(); ++i) {
    CHECK(at::equal(a_params[i], b_params[i]));
    auto& a_state = static_cast<torch::optim::SGDParamState&>(
        *a_sgd.state().at(c10::guts::to_string(a_params[i].unsafeGetTensorImpl())));
    auto& b_state = static_cast<torch::optim::SGDParamState&>(
        *b_sgd.state().at(c10::guts::to_string(b_params[i].unsafeGetTensorImpl())));
    CHECK(at::equal(a_state.momentum_buffer(), b_state.momentum_buffer()));
  }
}

namespace {

/// Trains small_model on Fashion-MNIST alone and with four peers averaging through strategy
/// A (a quarter of the samples each); checks every peer reaches the lone peer's accuracy.
template <class A>
void check_fashion_mnist_swarm(const std::string& prefix) {
  at::set_num_threads(1);
  constexpr std::int64_t total = 12000, batch = 32, peers = 4;
  constexpr int epochs = 5;
  auto train = examples::load_fashion_mnist(true, total);
  auto test = examples::load_fashion_mnist(false, 2000);
  const auto sgd_options = torch::optim::SGDOptions(0.01).momentum(0.9);

  // The baseline: one peer, every sample.
  auto baseline = small_model(7);
  {
    torch::optim::SGD sgd(baseline->parameters(), sgd_options);
    for (int e = 0; e < epochs; ++e)
      for (std::int64_t b = 0; b < total; b += batch) {
        sgd.zero_grad();
        torch::nn::functional::cross_entropy(baseline->forward(train.images.slice(0, b, b + batch)),
                                             train.labels.slice(0, b, b + batch))
            .backward();
        sgd.step();
      }
  }
  const double baseline_accuracy = accuracy(baseline, test);

  // The swarm: four peers, a quarter of the samples each, averaging every 10 steps.
  auto dhts = swarm(peers);
  std::vector<double> accuracies(peers);
  std::vector<optim::DecentralizedStats> stats(peers);
  std::vector<std::thread> threads;
  std::latch trained(peers);
  for (std::int64_t p = 0; p < peers; ++p)
    threads.emplace_back([&, p] {
      auto model = small_model(7);
      torch::optim::SGD sgd(model->parameters(), sgd_options);
      auto options = optim::DecentralizedOptions().prefix(prefix).target_group_size(peers).averaging_steps_period(10);
      options.averager().matchmaking_time(Seconds(2));
      optim::DecentralizedOptimizer<net::Tcp, dht::Kademlia<>, A> opt(sgd, *dhts[static_cast<std::size_t>(p)], options);
      const std::int64_t shard = total / peers;
      int step = 0;
      for (int e = 0; e < epochs; ++e)
        for (std::int64_t b = p * shard; b < (p + 1) * shard; b += batch) {
          opt.zero_grad();
          torch::nn::functional::cross_entropy(model->forward(train.images.slice(0, b, b + batch)),
                                               train.labels.slice(0, b, b + batch))
              .backward();
          opt.step();
          if (++step % 10 == 0) opt.wait_for_round(Seconds(10));
        }
      // Peers finish at different times; a last round together leaves them all with the average.
      trained.arrive_and_wait();
      auto last = opt.average_now();
      CHECK(last.ok);
      accuracies[static_cast<std::size_t>(p)] = accuracy(model, test);
      stats[static_cast<std::size_t>(p)] = opt.stats();
      opt.shutdown();
    });
  for (auto& t : threads) t.join();
  MESSAGE("single peer: ", baseline_accuracy, "%");
  for (std::size_t p = 0; p < accuracies.size(); ++p) {
    MESSAGE("peer ", p, ": ", accuracies[p], "% after ", stats[p].averaged, " of ", stats[p].rounds, " rounds averaged, last group ", stats[p].last_group_size);
    CHECK(stats[p].averaged >= stats[p].rounds / 2);
    CHECK(accuracies[p] >= baseline_accuracy - 2.0);
  }
}

}  // namespace

TEST_CASE("averaging: four averaging peers reach the single-peer accuracy on Fashion-MNIST at equal total samples") {
  check_fashion_mnist_swarm<averaging::Butterfly>("fmnist");
}

TEST_CASE("averaging: four peers averaging through Gloo reach the single-peer accuracy on Fashion-MNIST") {
  check_fashion_mnist_swarm<averaging::Gloo>("fmnist_gloo");
}

TEST_CASE("averaging: average_gradients brings the group's gradient into a later step") {
  auto dhts = swarm(2);
  std::vector<at::Tensor> w{at::zeros({3}).requires_grad_(), at::zeros({3}).requires_grad_()};
  std::vector<std::unique_ptr<torch::optim::SGD>> sgd;
  std::vector<std::unique_ptr<optim::DecentralizedOptimizer<>>> opt;
  auto options = optim::DecentralizedOptions().prefix("grads").target_group_size(2).average_parameters(false).average_gradients(true);
  options.averager().matchmaking_time(Seconds(3));
  for (std::size_t i = 0; i < 2; ++i) {
    sgd.push_back(std::make_unique<torch::optim::SGD>(std::vector<at::Tensor>{w[i]}, torch::optim::SGDOptions(1.0)));
    opt.push_back(std::make_unique<optim::DecentralizedOptimizer<>>(*sgd[i], *dhts[i], options));
  }
  // Step 1: gradients 1 and 3; w = -1 and -3; a round starts averaging the gradients (mean 2).
  w[0].mutable_grad() = at::full({3}, 1.0);
  w[1].mutable_grad() = at::full({3}, 3.0);
  opt[0]->step();
  opt[1]->step();
  auto other = std::async(std::launch::async, [&] { return opt[1]->wait_for_round(Seconds(10)); });
  REQUIRE(opt[0]->wait_for_round(Seconds(10)));
  REQUIRE(other.get());
  REQUIRE(opt[0]->stats().averaged == 1);
  // Step 2: zero local gradients; each applies its share of the group's: g = 0 + (2 - own).
  w[0].mutable_grad() = at::zeros({3});
  w[1].mutable_grad() = at::zeros({3});
  opt[0]->step();
  opt[1]->step();
  CHECK(at::allclose(w[0], at::full({3}, -2.0)));
  CHECK(at::allclose(w[1], at::full({3}, -2.0)));
}

TEST_CASE("averaging: the same Trainer code over the emulated network (latency 5-20 ms)") {
  net::Runtime runtime;
  auto network = net::SimNetwork::create(
      runtime.executor(), net::SimNetwork::Options().seed(3).min_latency(Seconds(0.005)).max_latency(Seconds(0.02)));
  auto sim = [&] { return net::SimulatedOptions().network(network); };
  auto options = [&](std::vector<std::string> peers) {
    auto o = TrainerOptions().dht(DHTOptions().listen_on("127.0.0.1:0").initial_peers(std::move(peers)));
    o.optimizer().prefix("emulated").target_group_size(2).averager().matchmaking_time(Seconds(3));
    return o;
  };
  auto a_model = torch::nn::Linear(8, 1);
  auto b_model = torch::nn::Linear(8, 1);
  torch::optim::SGD a_sgd(a_model->parameters(), torch::optim::SGDOptions(0.1));
  torch::optim::SGD b_sgd(b_model->parameters(), torch::optim::SGDOptions(0.1));
  Trainer<net::Simulated> a(a_sgd, options({}), sim());
  CHECK(a.address().starts_with("sim-"));
  Trainer<net::Simulated> b(b_sgd, options({a.address()}), sim());
  auto train = [](auto& trainer, auto& model, int seed) {
    at::manual_seed(seed);
    for (int i = 0; i < 5; ++i) {
      trainer.zero_grad();
      model->forward(at::randn({4, 8})).pow(2).mean().backward();
      trainer.step();
    }
    return trainer.optimizer().average_now();
  };
  auto b_done = std::async(std::launch::async, [&] { return train(b, b_model, 2); });
  auto a_result = train(a, a_model, 1);
  auto b_result = b_done.get();
  INFO(a_result.error, " / ", b_result.error);
  REQUIRE(a_result.ok);
  REQUIRE(b_result.ok);
  CHECK(at::equal(a_model->weight, b_model->weight));
  CHECK(at::equal(a_model->bias, b_model->bias));
}

// ----- Byzantine-robust aggregation, bounded weights, dropped and banned members -----

using averaging::Aggregation;
using averaging::AggregationOptions;

TEST_CASE("averaging: CenteredClip and the trimmed mean on known values, and their options validated") {
  // Seven honest rows near 1, one row far away.
  auto honest = at::ones({7, 6}, at::kDouble) + 0.01 * at::randn({7, 6}, at::kDouble);
  auto rows = at::cat({honest, at::full({1, 6}, 1000.0, at::kDouble)});
  auto w = at::ones({8}, at::kDouble);
  const auto honest_mean = honest.mean(0);
  auto rms = [](const at::Tensor& d) { return d.pow(2).mean().sqrt().item<double>(); };
  const double tau = 0.5;
  // The mean is dragged to ~126.
  CHECK(rms(averaging::aggregate(rows, w, AggregationOptions()) - honest_mean) > 100);
  for (auto start : {averaging::ClipStart::median, averaging::ClipStart::mean}) {
    // From the mean (~126), every row is farther than τ and the center moves at most τ an
    // iteration: ~300 iterations to get there. From the median, a few.
    auto clip = AggregationOptions().method(Aggregation::centered_clip).tau(tau).max_iterations(1000).start(start);
    // The far row pulls with weight 1 of 7 honest ones, at most τ: ‖v − mean‖ ≤ τ / 7 (RMS).
    CHECK(rms(averaging::aggregate(rows, w, clip) - honest_mean) <= tau / 7 * 1.001);
    // Deterministic: the same rows give the same bits.
    CHECK(at::equal(averaging::aggregate(rows, w, clip), averaging::aggregate(rows, w, clip)));
  }
  // Trimmed mean: per coordinate, drop the smallest and the largest, weighted mean of the rest.
  auto small = at::tensor({1.0, 2.0, 3.0, 4.0, 100.0}, at::kDouble).reshape({5, 1});
  auto trimmed = AggregationOptions().method(Aggregation::trimmed_mean).trim(1);
  CHECK(averaging::aggregate(small, at::ones({5}, at::kDouble), trimmed).item<double>() == doctest::Approx(3.0));
  CHECK(averaging::aggregate(small, at::tensor({1.0, 1.0, 1.0, 3.0, 1.0}, at::kDouble), trimmed).item<double>() ==
        doctest::Approx((2.0 + 3.0 + 3 * 4.0) / 5));
  // With fewer rows than 2 × trim + 1, fewer are dropped: the median at worst.
  CHECK(averaging::aggregate(small.slice(0, 0, 3), at::ones({3}, at::kDouble), AggregationOptions(trimmed).trim(2))
            .item<double>() == doctest::Approx(2.0));
  CHECK(at::allclose(averaging::aggregate(rows, w, trimmed), honest_mean, 0, 0.05));
  // Ties keep the group's order: the same rows, the same bits.
  auto ties = at::tensor({5.0, 5.0, 5.0, 1.0}, at::kDouble).reshape({4, 1});
  CHECK(averaging::aggregate(ties, at::tensor({1.0, 2.0, 3.0, 1.0}, at::kDouble), trimmed).item<double>() ==
        doctest::Approx(5.0));

  // Bad options.
  CHECK_THROWS_AS(AggregationOptions().tau(0).validate(), InvalidArgument);
  CHECK_THROWS_AS(AggregationOptions().tau(std::nan("")).validate(), InvalidArgument);
  CHECK_THROWS_AS(AggregationOptions().tau(INFINITY).validate(), InvalidArgument);
  CHECK_THROWS_AS(AggregationOptions().max_iterations(0).validate(), InvalidArgument);
  CHECK_THROWS_AS(AggregationOptions().eps(-1).validate(), InvalidArgument);
  CHECK_THROWS_AS(AggregationOptions().method(Aggregation::trimmed_mean).trim(0).validate(), InvalidArgument);
  CHECK_THROWS_AS(AggregationOptions().method(Aggregation::trimmed_mean).trim(2).validate(4), InvalidArgument);
  CHECK_NOTHROW(AggregationOptions().method(Aggregation::trimmed_mean).trim(2).validate(5));
  auto dhts = swarm(1);
  auto tensors = peer_tensors(1);
  // trim 1 needs groups of at least 3: min_group_size 2 is refused.
  CHECK_THROWS_AS(Averager(*dhts[0], tensors, fast("robust_opts", 4).aggregation(trimmed)), InvalidArgument);
  CHECK_NOTHROW(Averager(*dhts[0], tensors, fast("robust_opts", 4).min_group_size(3).aggregation(trimmed)));
  CHECK_THROWS_AS(Averager(*dhts[0], tensors, fast("robust_opts", 4).max_weight(0)), InvalidArgument);
  CHECK_THROWS_AS(Averager(*dhts[0], tensors, fast("robust_opts", 4).max_weight(INFINITY)), InvalidArgument);
  CHECK_THROWS_AS(Averager(*dhts[0], tensors, fast("robust_opts", 4).ban_duration(Seconds(-1))), InvalidArgument);
  // JSON: by name; an unknown method is an error.
  auto options = AveragerOptions::from_json_text(
      R"({"prefix": "x", "min_group_size": 3, "max_weight": 64, "ban_duration": 30,
          "aggregation": {"method": "trimmed_mean", "trim": 1}})");
  CHECK(options.aggregation().method() == Aggregation::trimmed_mean);
  CHECK(options.max_weight() == 64);
  CHECK(options.ban_duration() == Seconds(30));
  CHECK(nlohmann::json(AggregationOptions().method(Aggregation::centered_clip))["method"] == "centered_clip");
  CHECK_THROWS_AS(AveragerOptions::from_json_text(R"({"aggregation": {"method": "median"}})"), InvalidArgument);
}

namespace {

/// Peer i's vector: a base shared by all (N(0, 1)) plus its own noise (N(0, 0.1²)), as peers
/// that train one model hold parameters near each other.
std::vector<at::Tensor> near_tensors(std::size_t peer) {
  auto base = at::randn({4000}, at::make_generator<at::CPUGeneratorImpl>(1));
  auto noise = at::randn({4000}, at::make_generator<at::CPUGeneratorImpl>(100 + peer));
  return {(base + 0.1 * noise).reshape({40, 100}).clone(), at::full({5}, 0.5)};
}

/// The attacks of a Byzantine peer on the parts it sends.
averaging::PartTamper scaled_attack() {
  return [](const at::Tensor& chunk) { return chunk * 1000; };
}
averaging::PartTamper random_attack() {
  // Its own generator: only the attacker's io thread draws from it.
  auto generator = at::make_generator<at::CPUGeneratorImpl>(7);
  return [generator](const at::Tensor& chunk) { return at::randn(chunk.sizes(), generator) * 100; };
}

/// Root mean square of a - b.
double rms_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).pow(2).mean().sqrt().item<double>();
}

/// Eight peers on `dhts`, peer 7 sending its parts through `attack`; every peer aggregates with
/// `aggregation`. Returns the honest peers' flattened results (after checking that they
/// averaged completely and hold the same bits), and the honest peers' inputs.
std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>> attacked_round(std::vector<std::unique_ptr<DHT>>& dhts,
                                                                           const std::string& prefix,
                                                                           AggregationOptions aggregation,
                                                                           averaging::PartTamper attack) {
  const std::size_t n = dhts.size();
  std::vector<std::vector<at::Tensor>> tensors;
  std::vector<std::unique_ptr<Averager>> averagers;
  std::vector<at::Tensor> honest_inputs;
  for (std::size_t i = 0; i < n; ++i) {
    tensors.push_back(near_tensors(i));
    if (i + 1 < n) honest_inputs.push_back(averaging::flatten_tensors(tensors.back()));
    // 256-element chunks: each member's part travels in two chunks, each aggregated alone.
    auto options = fast(prefix, n).min_group_size(3).part_size_bytes(1024).aggregation(aggregation);
    if (i + 1 == n) options.tamper_outgoing_for_testing(attack);
    averagers.push_back(std::make_unique<Averager>(*dhts[i], tensors.back(), options));
  }
  auto results = step_all(averagers);
  std::vector<at::Tensor> honest;
  for (std::size_t i = 0; i + 1 < n; ++i) {
    INFO("peer ", i, ": ", results[i].error);
    REQUIRE(results[i].ok);
    CHECK(results[i].group_size == n);
    CHECK(results[i].complete());  // scaled and random values are valid chunks: nobody is dropped
    CHECK(results[i].dropped.empty());
    honest.push_back(averaging::flatten_tensors(tensors[i]));
    CHECK(at::equal(honest.back(), honest.front()));
  }
  return {honest, honest_inputs};
}

}  // namespace

TEST_CASE("averaging: 1 of 8 peers sends scaled or random parts - CenteredClip and the trimmed mean stay within their bound of the honest mean, the plain mean does not") {
  auto dhts = swarm(8);
  const double tau = 1.0;
  const auto clip = AggregationOptions().method(Aggregation::centered_clip).tau(tau).max_iterations(50).eps(1e-9);
  const auto trimmed = AggregationOptions().method(Aggregation::trimmed_mean).trim(1);
  for (auto [attack_name, attack] : {std::pair{"scaled", scaled_attack()}, std::pair{"random", random_attack()}}) {
    const std::string name = attack_name;
    INFO("attack: ", name);
    {
      // CenteredClip: at its fixed point the honest members (within τ of the center) pull it to
      // their mean and the attacker, weight 1 of 7 honest, at most τ away: RMS(v − mean) ≤ τ/7.
      auto [honest, inputs] = attacked_round(dhts, "clip_" + name, clip, attack);
      const auto mean = at::stack(inputs).to(at::kDouble).mean(0);
      MESSAGE(name, " attack, CenteredClip: RMS distance from the honest mean ", rms_diff(honest[0], mean),
              " (bound ", tau / 7, ")");
      CHECK(rms_diff(honest[0], mean) <= tau / 7);
    }
    {
      // The trimmed mean (trim 1 of 8): every coordinate lies between the honest values' min and max.
      auto [honest, inputs] = attacked_round(dhts, "trim_" + name, trimmed, attack);
      const auto stacked = at::stack(inputs);
      const auto lo = std::get<0>(stacked.min(0)), hi = std::get<0>(stacked.max(0));
      const auto mean = stacked.to(at::kDouble).mean(0);
      MESSAGE(name, " attack, trimmed mean: RMS distance from the honest mean ", rms_diff(honest[0], mean));
      CHECK(at::all(honest[0] >= lo - 1e-5).item<bool>());
      CHECK(at::all(honest[0] <= hi + 1e-5).item<bool>());
      CHECK(rms_diff(honest[0], mean) <= tau / 7);
    }
    {
      // The same attack on the plain mean: far beyond both bounds.
      auto [honest, inputs] = attacked_round(dhts, "mean_" + name, AggregationOptions(), attack);
      const auto mean = at::stack(inputs).to(at::kDouble).mean(0);
      MESSAGE(name, " attack, plain mean: RMS distance from the honest mean ", rms_diff(honest[0], mean));
      CHECK(rms_diff(honest[0], mean) > 10 * tau / 7);
    }
  }
}

namespace {

/// Three honest peers and one (peer 3) whose parts go through `attack`: every honest peer drops
/// and bans it, and averages the rest; its part keeps each honest peer's values, as when a
/// member dies. A second round forms without it.
void check_bad_parts_dropped(const std::string& prefix, averaging::PartTamper attack, const std::string& reason) {
  auto dhts = swarm(4);
  const auto attacker_address = dhts[3]->visible_addresses().at(0);
  std::vector<std::vector<at::Tensor>> tensors, before;
  std::vector<std::unique_ptr<Averager>> averagers;
  for (std::size_t i = 0; i < 4; ++i) {
    tensors.push_back(near_tensors(i));
    before.push_back(clones(tensors.back()));
    auto options = fast(prefix, 4).ban_duration(Seconds(600));
    if (i == 3) options.tamper_outgoing_for_testing(attack);
    averagers.push_back(std::make_unique<Averager>(*dhts[i], tensors.back(), options));
  }
  auto results = step_all(averagers);
  REQUIRE(results[0].gathered.size() == 4);
  // The attacker's index in the group (the order the leader fixed), from what each attached.
  std::size_t attacker = 4;
  for (std::size_t m = 0; m < 4; ++m)
    if (results[0].gathered[m]["peer"] == 3) attacker = m;
  REQUIRE(attacker < 4);
  const auto flat_size = averaging::flatten_tensors(before[0]).numel();
  const auto parts = averaging::split_evenly(flat_size, 4);  // no bandwidths announced
  std::vector<at::Tensor> flat_before;
  for (const auto& b : before) flat_before.push_back(averaging::flatten_tensors(b).to(at::kDouble));
  const auto honest_mean = (flat_before[0] + flat_before[1] + flat_before[2]) / 3;
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("peer ", i, ": ", results[i].error);
    REQUIRE(results[i].ok);
    REQUIRE(results[i].dropped.size() == 1);
    CHECK(results[i].dropped[0].index == attacker);
    CHECK(results[i].dropped[0].address == attacker_address);
    CHECK(results[i].dropped[0].peer == dhts[3]->identity().peer_id());
    CHECK(results[i].dropped[0].reason.find(reason) != std::string::npos);
    REQUIRE(results[i].unaveraged.size() == 1);
    CHECK(results[i].unaveraged[0].begin == parts[attacker].begin);
    CHECK(results[i].unaveraged[0].end == parts[attacker].end);
    const auto after = averaging::flatten_tensors(tensors[i]).to(at::kDouble);
    for (std::size_t p = 0; p < 4; ++p) {
      INFO("part ", p);
      const auto got = after.slice(0, parts[p].begin, parts[p].end);
      if (p == attacker) CHECK(at::equal(got, flat_before[i].slice(0, parts[p].begin, parts[p].end)));
      else CHECK((got - honest_mean.slice(0, parts[p].begin, parts[p].end)).abs().max().item<double>() <= 1e-5);
    }
    const auto bans = averagers[i]->banned_peers();
    REQUIRE(bans.size() == 1);
    CHECK(bans[0].address == attacker_address);
    CHECK(bans[0].peer == dhts[3]->identity().peer_id());
    CHECK(bans[0].until > SteadyClock::now() + std::chrono::seconds(500));
  }
  // The next round forms without it: the honest peers average completely; it finds no group.
  for (std::size_t i = 0; i < 4; ++i) before[i] = clones(tensors[i]);
  auto again = step_all(averagers);
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("peer ", i, ": ", again[i].error);
    REQUIRE(again[i].ok);
    CHECK(again[i].group_size == 3);
    CHECK(again[i].complete());
    CHECK(max_abs_diff(tensors[i], expected_mean({before[0], before[1], before[2]}, {1, 1, 1})) <= 1e-5);
  }
  INFO("attacker: ", again[3].error);
  CHECK_FALSE(again[3].ok);
  // An operator may lift a ban, by peer id or by address.
  averagers[0]->lift_ban(dhts[3]->identity().peer_id());
  CHECK(averagers[0]->banned_peers().empty());
  averagers[1]->lift_ban(attacker_address);
  CHECK(averagers[1]->banned_peers().empty());
}

}  // namespace

TEST_CASE("averaging: a member that sends NaN parts is dropped and banned, and the honest peers average the rest") {
  check_bad_parts_dropped("nan_parts", [](const at::Tensor& c) { return at::full_like(c, NAN); }, "non-finite");
}

TEST_CASE("averaging: a member that sends parts of the wrong shape or dtype is dropped and banned") {
  SUBCASE("one element too many") {
    check_bad_parts_dropped("long_parts", [](const at::Tensor& c) { return at::cat({c, at::zeros({1})}); },
                            "should be a float vector");
  }
  SUBCASE("two dimensions") {
    check_bad_parts_dropped("2d_parts", [](const at::Tensor& c) { return c.reshape({1, -1}); }, "should be a float vector");
  }
  SUBCASE("integers") {
    check_bad_parts_dropped("int_parts", [](const at::Tensor& c) { return c.to(at::kInt); }, "should be a float vector");
  }
}

namespace {

/// Checks that every part peer `i` reduced with the others, all but the part of the fake member
/// at `group.my_index`, holds the mean of the three honest peers' tensors before the round.
void check_honest_mean_outside_fake_part(const Peers<>& peers, const averaging::GroupInfo& group, std::size_t i) {
  const auto parts = averaging::partition(group, averaging::flatten_tensors(peers.before[0]).numel());
  std::vector<at::Tensor> before;
  for (const auto& b : peers.before) before.push_back(averaging::flatten_tensors(b).to(at::kDouble));
  const auto honest_mean = (before[0] + before[1] + before[2]) / 3;
  const auto after = averaging::flatten_tensors(peers.tensors[i]).to(at::kDouble);
  for (std::size_t p = 0; p < parts.size(); ++p)
    if (p != group.my_index)
      CHECK((after.slice(0, parts[p].begin, parts[p].end) - honest_mean.slice(0, parts[p].begin, parts[p].end))
                .abs()
                .max()
                .item<double>() <= 1e-5);
}

}  // namespace

TEST_CASE("averaging: a member claiming weight 1e30 or NaN is refused, dropped and banned") {
  // This peer's own step refuses it before anything is sent.
  {
    auto dhts = swarm(1);
    auto tensors = peer_tensors(1);
    Averager averager(*dhts[0], tensors, fast("own_weight", 2).max_weight(100));
    CHECK_THROWS_AS(averager.step(1e30), InvalidArgument);
    CHECK_THROWS_AS(averager.step(std::nan("")), InvalidArgument);
    CHECK_THROWS_AS(averager.step(INFINITY), InvalidArgument);
    CHECK_THROWS_AS(averager.step(101), InvalidArgument);
  }
  // A hand-written member sends its chunks with such a weight to the three honest reducers.
  for (double weight : {1e30, std::nan("")}) {
    INFO("weight ", weight);
    const std::string prefix = std::isnan(weight) ? "nan_weight" : "huge_weight";
    Peers<> peers(swarm(3), 50, fast(prefix, 4));
    auto fake = std::make_unique<FakeMember>(false);
    const auto fake_flat = averaging::flatten_tensors(peer_tensors(98));
    std::vector<std::string> refusals;
    auto joined = std::async(std::launch::async, [&] {
      auto n = fake->join(*peers.dhts[0], peers.averagers[0]->group_key(), averaging::schema_hash(peers.tensors[0]));
      for (std::size_t m = 0; m < fake->group.size(); ++m)
        if (m != fake->group.my_index) refusals.push_back(fake->send_part(prefix, fake_flat, m, weight, Seconds(5)));
      fake->rpc->close();
      return n;
    });
    auto results = step_all(peers.averagers);
    REQUIRE(joined.get() == 4);
    const auto& group = fake->group;
    for (const auto& r : refusals) {
      INFO(r);
      CHECK(r.find("weight") != std::string::npos);
    }
    for (std::size_t i = 0; i < 3; ++i) {
      INFO("peer ", i, ": ", results[i].error);
      REQUIRE(results[i].ok);
      REQUIRE(results[i].dropped.size() == 1);
      CHECK(results[i].dropped[0].index == group.my_index);
      CHECK(results[i].dropped[0].reason.find("weight") != std::string::npos);
      check_honest_mean_outside_fake_part(peers, group, i);
      const auto bans = peers.averagers[i]->banned_peers();
      REQUIRE(bans.size() == 1);
      CHECK(bans[0].address == fake->address);
      CHECK(bans[0].peer == fake->rpc->peer_id());
    }
  }
}

TEST_CASE("averaging: a round's vector is reused once nothing refers to it, never while something does") {
  averaging::ReusedVector reused;
  const std::vector<at::Tensor> tensors{at::arange(6, at::kFloat).reshape({2, 3}), at::ones({4}, at::kDouble)};
  const auto expected = averaging::flatten_tensors(tensors);
  auto a = averaging::flatten_tensors(tensors, &reused);
  CHECK(a.equal(expected));
  const void* first = a.data_ptr();
  // A view of it outlives the round: the next round gets another vector, and the view its values.
  auto view = a.slice(0, 2, 4);
  a = at::Tensor();
  auto b = averaging::flatten_tensors(tensors, &reused);
  CHECK(b.data_ptr() != first);
  CHECK(b.equal(expected));
  CHECK(view.equal(at::tensor({2.f, 3.f})));
  // Nothing refers to it any more: the round after gets the same memory, refilled.
  const void* second = b.data_ptr();
  b.zero_();
  b = at::Tensor();
  auto c = averaging::flatten_tensors(tensors, &reused);
  CHECK(c.data_ptr() == second);
  CHECK(c.equal(expected));
  c = at::Tensor();
  CHECK(reused.take(3).numel() == 3);
}

TEST_CASE("averaging: a join reply whose index is not an integer (NaN, 1e300, 1.0, text) is refused as malformed") {
  // Found by fuzz_averaging: a float index was converted to an integer unchecked.
  using nlohmann::json;
  const auto member = [](std::string address) {
    averaging::Member m;
    m.address = std::move(address);
    return m;
  };
  json reply = {{"accepted", true},
                {"group_id", "abc"},
                {"members", json::array({member("10.0.0.2:1000"), member("10.0.0.1:1000")})},
                {"index", 1}};
  const auto answer = averaging::decode_join_reply(reply, "10.0.0.1:1000", false, 0);
  REQUIRE(answer.group);
  CHECK(answer.group->my_index == 1);
  for (const json& index : {json(std::nan("")), json(1e300), json(-1e300), json(1.0), json(-1), json("1")}) {
    CAPTURE(index.dump());
    reply["index"] = index;
    try {
      (void)averaging::decode_join_reply(reply, "10.0.0.1:1000", false, 0);
      FAIL("accepted");
    } catch (const Error& e) {
      CHECK(e.code() == errc::bad_header);
    }
  }
}

TEST_CASE("averaging: a member cannot send parts under another member's index") {
  // A hand-written member joins three honest peers, then sends a chunk to every reducer under
  // another member's index. The reducers refuse it (the caller's proven id is not that
  // member's), drop nobody, and average the honest members' chunks.
  Peers<> peers(swarm(3), 60, fast("impersonation", 4));
  auto fake = std::make_unique<FakeMember>(false);
  const auto fake_flat = averaging::flatten_tensors(peer_tensors(97));
  std::vector<std::string> refusals;
  std::size_t victim = 0;
  auto joined = std::async(std::launch::async, [&] {
    auto n = fake->join(*peers.dhts[0], peers.averagers[0]->group_key(), averaging::schema_hash(peers.tensors[0]));
    victim = fake->group.my_index == 0 ? 1 : 0;
    for (std::size_t m = 0; m < fake->group.size(); ++m)
      if (m != fake->group.my_index) refusals.push_back(fake->send_part("impersonation", fake_flat, m, 1.0, Seconds(5), victim));
    fake->rpc->close();
    return n;
  });
  auto results = step_all(peers.averagers);
  REQUIRE(joined.get() == 4);
  const auto& group = fake->group;
  for (const auto& member : group.members) CHECK(hive::public_key_of(member.peer).has_value());
  CHECK(group.members[group.my_index].peer == fake->rpc->peer_id());
  REQUIRE(refusals.size() == 3);
  for (const auto& r : refusals) {
    INFO(r);
    CHECK(r.find(fmt::format("sender {} of round", victim)) != std::string::npos);
    CHECK(r.find(fake->rpc->peer_id()) != std::string::npos);
  }
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("peer ", i, ": ", results[i].error);
    REQUIRE(results[i].ok);
    CHECK(results[i].dropped.empty());  // not the member it named, not itself
    CHECK(peers.averagers[i]->banned_peers().empty());
    check_honest_mean_outside_fake_part(peers, group, i);
  }
}

namespace {

/// Trains small_model on Fashion-MNIST with `peers` peers averaging their parameters every 5
/// steps with `averager`'s aggregation, each on its own shard; with `attack`, the last peer
/// trains as the others but sends its parts through it. Returns each honest peer's accuracy,
/// after checking that it averaged in at least half of its rounds and in the last one.
std::vector<double> fashion_mnist_under_attack(const std::string& prefix, std::int64_t peers,
                                               const AveragerOptions& averager, averaging::PartTamper attack) {
  at::set_num_threads(1);
  constexpr std::int64_t shard = 1600, batch = 32;
  constexpr int epochs = 3;
  static const auto train = examples::load_fashion_mnist(true, 5 * shard);
  static const auto test = examples::load_fashion_mnist(false, 2000);
  const std::int64_t honest = attack ? peers - 1 : peers;
  auto dhts = swarm(static_cast<std::size_t>(peers));
  std::vector<double> accuracies(static_cast<std::size_t>(honest));
  std::vector<optim::DecentralizedStats> stats(static_cast<std::size_t>(honest));
  std::vector<char> last_ok(static_cast<std::size_t>(honest), 0);
  std::vector<std::thread> threads;
  std::latch trained(peers);
  for (std::int64_t p = 0; p < peers; ++p)
    threads.emplace_back([&, p] {
      auto model = examples::seeded(7, [] { return small_model(7); });
      torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
      auto options = optim::DecentralizedOptions().prefix(prefix).averaging_steps_period(5).averager(averager);
      options.target_group_size(static_cast<std::size_t>(peers)).averager().prefix(prefix).matchmaking_time(Seconds(2));
      if (p == honest) options.averager().tamper_outgoing_for_testing(attack);
      optim::DecentralizedOptimizer opt(sgd, *dhts[static_cast<std::size_t>(p)], options);
      int step = 0;
      // The attacker trains on shard 4; the honest peers on shards 0..3 in both runs.
      const std::int64_t first = (p == honest ? 4 : p) * shard;
      for (int e = 0; e < epochs; ++e)
        for (std::int64_t b = first; b < first + shard; b += batch) {
          opt.zero_grad();
          torch::nn::functional::cross_entropy(model->forward(train.images.slice(0, b, b + batch)),
                                               train.labels.slice(0, b, b + batch))
              .backward();
          opt.step();
          if (++step % 5 == 0) opt.wait_for_round(Seconds(10));
        }
      trained.arrive_and_wait();
      const auto last = opt.average_now();
      if (p < honest) {
        accuracies[static_cast<std::size_t>(p)] = accuracy(model, test);
        stats[static_cast<std::size_t>(p)] = opt.stats();
        last_ok[static_cast<std::size_t>(p)] = last.ok;
      }
      opt.shutdown();
    });
  for (auto& t : threads) t.join();
  for (std::int64_t p = 0; p < honest; ++p) {
    const auto& st = stats[static_cast<std::size_t>(p)];
    INFO(prefix, " peer ", p, ": ", st.averaged, " of ", st.rounds, " rounds averaged");
    CHECK(st.averaged >= st.rounds / 2);
    CHECK(last_ok[static_cast<std::size_t>(p)]);
  }
  return accuracies;
}

}  // namespace

TEST_CASE("averaging: Fashion-MNIST with 1 of 5 peers sending scaled parts - CenteredClip stays within 3 points of the run without attacker") {
  const auto clean = fashion_mnist_under_attack("fmnist_clean", 4, fast("", 4), nullptr);
  const auto clip = fast("", 5).aggregation(
      AggregationOptions().method(Aggregation::centered_clip).tau(1e-3).max_iterations(20));
  const auto attacked = fashion_mnist_under_attack("fmnist_clip", 5, clip, scaled_attack());
  double clean_min = 100;
  for (double a : clean) clean_min = std::min(clean_min, a);
  for (std::size_t p = 0; p < attacked.size(); ++p) {
    MESSAGE("peer ", p, ": ", clean[p], "% without attacker, ", attacked[p], "% with one, under CenteredClip");
    CHECK(attacked[p] >= clean_min - 3.0);
  }
}

#ifdef HIVE_AVERAGING_PEER
#include "../common/child_process.hpp"

TEST_CASE("averaging: two averaging_peer programs, the second joining the first, average and report accuracy") {
  const std::vector<std::string> common{"--train_samples", "4000", "--test_samples", "500",    "--epochs",
                                        "2",               "--target_group_size", "2", "--averaging_period", "10",
                                        "--matchmaking_time", "2", "--prefix", "ctest_pair"};
  auto args = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv{HIVE_AVERAGING_PEER};
    argv.insert(argv.end(), common.begin(), common.end());
    argv.insert(argv.end(), extra.begin(), extra.end());
    return argv;
  };
  test::ChildProcess first(args({"--shard", "0/2"}));
  auto line = first.read_until("--initial_peers ", 60s);
  REQUIRE(line);
  const auto address = line->substr(line->find("--initial_peers ") + 16);
  test::ChildProcess second(args({"--shard", "1/2", "--initial_peers", address}));
  std::string first_out, second_out;
  const auto second_status = second.wait_exit(120s, &second_out);
  const auto first_status = first.wait_exit(120s, &first_out);
  REQUIRE(first_status.has_value());
  REQUIRE(second_status.has_value());
  CHECK(WIFEXITED(*first_status));
  CHECK(WEXITSTATUS(*first_status) == 0);
  CHECK(WIFEXITED(*second_status));
  CHECK(WEXITSTATUS(*second_status) == 0);
  INFO(second_out);
  CHECK(second_out.find("Loaded the swarm's state from a peer") != std::string::npos);
  CHECK(second_out.find("(last group 2)") != std::string::npos);  // it averaged with the first
  CHECK(second_out.find("test accuracy:") != std::string::npos);
  CHECK(first_out.find("test accuracy:") != std::string::npos);
}
#endif
