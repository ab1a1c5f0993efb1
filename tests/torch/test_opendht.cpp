// The averaging layers on the OpenDHT routing model: peers whose DHT runs on OpenDHT
// (dht::OpenDHT) find each other's averaging announcements, form groups and average, and a
// newcomer downloads a shared state. OpenDHT's namespace is `::dht`, hence hive::dht in full.
#include <hive/averaging/averager.hpp>
#include <hive/dht/opendht.hpp>

#include <doctest/doctest.h>

#include <future>
#include <memory>
#include <vector>

namespace {

struct OpenDhtPolicies : hive::DefaultPolicies {
  using routing = hive::dht::OpenDHT;
};
using OpenDhtDHT = hive::DHTFor<OpenDhtPolicies>;
using OpenDhtAverager = hive::AveragerFor<OpenDhtPolicies>;

}  // namespace

TEST_CASE("opendht: four averagers on an OpenDHT-routed swarm form a group and end with the mean") {
  std::vector<std::unique_ptr<OpenDhtDHT>> dhts;
  dhts.push_back(std::make_unique<OpenDhtDHT>(hive::DHTOptions().listen_on("127.0.0.1:0")));
  for (int i = 1; i < 4; ++i)
    dhts.push_back(std::make_unique<OpenDhtDHT>(
        hive::DHTOptions().listen_on("127.0.0.1:0").initial_peers(dhts[0]->visible_addresses())));
  const auto options = hive::averaging::AveragerOptions()
                           .prefix("opendht_avg")
                           .target_group_size(4)
                           .matchmaking_time(hive::Seconds(5))
                           .request_timeout(hive::Seconds(3));
  std::vector<std::vector<at::Tensor>> tensors;
  std::vector<std::unique_ptr<OpenDhtAverager>> averagers;
  for (int i = 0; i < 4; ++i) tensors.push_back({at::full({64}, static_cast<double>(i))});
  for (int i = 0; i < 4; ++i) averagers.push_back(std::make_unique<OpenDhtAverager>(*dhts[static_cast<std::size_t>(i)], tensors[static_cast<std::size_t>(i)], options));
  std::vector<std::future<hive::averaging::StepResult>> steps;
  for (auto& a : averagers) steps.push_back(a->async_step());
  std::size_t averaged = 0;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    auto r = steps[i].get();
    INFO("peer ", i, ": ", r.error);
    CHECK(r.ok);
    if (r.ok) {
      ++averaged;
      CHECK(r.group_size >= 2);
    }
  }
  REQUIRE(averaged == 4);
  // Groups may have formed as 4, or 2 + 2: each group holds its own mean, all equal in a 4.
  for (const auto& t : tensors) CHECK(at::allclose(t[0], at::full({64}, t[0][0].item<double>())));

  // State sharing through the same routing: a newcomer downloads peer 0's tensors.
  averagers[0]->set_state_provider([&] { return hive::averaging::State{{{"step", 7}}, {tensors[0][0].clone()}}; }, 1);
  OpenDhtDHT newcomer_dht(hive::DHTOptions().listen_on("127.0.0.1:0").initial_peers(dhts[0]->visible_addresses()));
  std::vector<at::Tensor> mine{at::zeros({64})};
  OpenDhtAverager newcomer(newcomer_dht, mine, options);
  std::optional<hive::averaging::State> state;
  for (int attempt = 0; attempt < 6 && !state; ++attempt) state = newcomer.load_state_from_peers(hive::Seconds(5));
  REQUIRE(state);
  CHECK(state->metadata["step"] == 7);
  REQUIRE(state->tensors.size() == 1);
  CHECK(at::equal(state->tensors[0], tensors[0][0]));
}
