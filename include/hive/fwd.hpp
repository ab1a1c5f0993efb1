#pragma once
/// @file
/// Forward declarations of hive's public class templates and policies, with their defaults
/// stated once.

namespace hive {

class Id160;
class Buffer;
struct Message;
struct Limits;
class Error;
class RemoteError;

namespace net {
class Tcp;
class Simulated;
class SimNetwork;
class Runtime;
struct RpcOptions;
template <class Request, class Response>
struct Method;
}  // namespace net

}  // namespace hive
