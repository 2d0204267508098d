-- A fixed request rate for wrk (which has no rate option): every request takes
-- the next free slot of a schedule BENCH_RATE per second wide, and delay()
-- waits until that slot. Latency is measured from the actual send (wrk sets
-- the start after the delay), so below saturation it is the service time.
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local interval = 1000 / tonumber(os.getenv("BENCH_RATE"))
local next_slot = nil

function delay()
  local now = now_ms()
  if next_slot == nil or next_slot < now - 50 then
    next_slot = now -- start, or fell far behind: do not burst to catch up
  end
  local slot = next_slot
  next_slot = next_slot + interval
  local wait = slot - now
  if wait < 0 then return 0 end
  return math.floor(wait + 0.5)
end
