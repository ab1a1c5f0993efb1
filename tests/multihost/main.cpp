// The doctest runner of the multi-host tests. Run with --serve ADDRESS it is instead a peer
// for them: it serves "hang" (answers after an hour, printing "hang called" when a call
// arrives) until killed; with --call ADDRESS TIMEOUT it calls "hang" there and prints how the
// call ended ("error after S s: message").
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <hive/net/rpc.hpp>
#include <hive/net/runtime.hpp>
#include <hive/net/tcp.hpp>

#include <sys/prctl.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>

namespace {

int serve(const std::string& address) {
  hive::net::Runtime runtime(1);
  auto server = hive::net::Rpc<hive::net::Tcp>::create(runtime.executor());
  server->add_handler("hang", [](hive::net::CallContext, hive::Message) -> asio::awaitable<hive::Message> {
    std::cout << "hang called" << std::endl;
    asio::steady_timer t(co_await asio::this_coro::executor, std::chrono::hours(1));
    co_await t.async_wait(asio::use_awaitable);
    co_return hive::Message{};
  });
  // Dies with the test that started it, even when that test is killed.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  std::cout << "serving at " << server->listen(address) << std::endl;
  for (;;) ::pause();
}

int call(const std::string& address, double timeout) {
  hive::net::Runtime runtime(1);
  auto client = hive::net::Rpc<hive::net::Tcp>::create(runtime.executor());
  const auto t0 = std::chrono::steady_clock::now();
  try {
    client->call(address, "hang", hive::Message{}, hive::Seconds(timeout));
    std::cout << "answered" << std::endl;
  } catch (const std::exception& e) {
    std::cout << "error after " << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()
              << " s: " << e.what() << std::endl;
  }
  client->close();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--serve") == 0) return serve(argv[2]);
  if (argc == 4 && std::strcmp(argv[1], "--call") == 0) return call(argv[2], std::stod(argv[3]));
  doctest::Context context(argc, argv);
  return context.run();
}
