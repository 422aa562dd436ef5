// Intel AMX tile plumbing shared by the kernels here: the tile configuration record
// LDTILECFG reads, and the request for the tile state that Linux (5.16+) wants first.
#pragma once

#include <cstdint>

#include <sys/syscall.h>
#include <unistd.h>

// Palette 1's configuration: per tile, bytes per row (colsb) and rows.
struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Asks the kernel for permission to use the AMX tile state for this process; 0 on
// success (asking again is harmless).
inline int request_amx_permission() {
  constexpr int kArchRequestXcompPerm = 0x1023, kXfeatureTileData = 18;
  return static_cast<int>(syscall(SYS_arch_prctl, kArchRequestXcompPerm, kXfeatureTileData));
}
