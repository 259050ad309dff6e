// A consumer that reaches the ops only through the dispatcher, linked with --as-needed
// (tests/cpp/CMakeLists.txt): the ops are there only if the link kept libwildcat, whose loading
// registers them.
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>

int main() {
  if (!c10::Dispatcher::singleton().findSchema({"wildcat::compress_kv", ""}).has_value()) {
    std::fprintf(stderr, "wildcat::compress_kv is not registered: the linker dropped libwildcat\n");
    return 1;
  }
  return 0;
}
