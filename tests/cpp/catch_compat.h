// Catch2 v2 (one header) and v3 (split headers) behind one include; CMake passes the major
// version it found, so the headers always match the library linked.
#pragma once

#if WILDCAT_CATCH2_MAJOR >= 3
#include <catch2/catch_message.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#else
#include <catch2/catch.hpp>
#endif
