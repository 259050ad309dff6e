// Catch2 v2 needs its main() compiled into one translation unit (v3 ships Catch2WithMain).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
