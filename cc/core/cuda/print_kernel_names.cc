// Build tool: writes the name expression of every kernel the launchers may ask for, one
// per line, to the file given (rewritten only when the list changes, so that NVRTC runs
// again only for a new list). cmake/Cuda.cmake runs it before NVRTC.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <string>

#include "core/cuda/kernel_names.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " OUTPUT\n";
    return 2;
  }
  std::set<std::string> seen;  // a launcher may list a kernel another lists too
  std::ostringstream list;
  tfbn::cuda::ForEachKernelName([&](const std::string& name) {
    if (seen.insert(name).second) list << name << '\n';
  });
  std::ifstream old(argv[1]);
  std::stringstream current;
  current << old.rdbuf();
  if (old && current.str() == list.str()) return 0;
  std::ofstream out(argv[1]);
  out << list.str();
  return out ? 0 : 1;
}
