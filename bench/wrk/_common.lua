-- Shared by every load script (prepended by bench.run). Arguments after `--`:
--   1: bearer key or "-"   2: coach id space   3: file of reservation ids or "-"
--   4: items per batch request
local threads, counter = {}, 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

local headers = {["Content-Type"] = "application/json"}
local coaches, ids, per_batch, nthreads = 1000000, {}, 100, 2
local cursor = 0

function init(args)
  if args[1] and args[1] ~= "-" then
    headers["Authorization"] = "Bearer " .. args[1]
  end
  coaches = tonumber(args[2] or "1000000")
  if args[3] and args[3] ~= "-" then
    for line in io.lines(args[3]) do
      ids[#ids + 1] = line
    end
  end
  per_batch = tonumber(args[4] or "100")
  nthreads = tonumber(args[5] or "2")
  cursor = tid - 1
  math.randomseed(os.time() * 7919 + tid)
end

local function coach()
  return "bench-" .. math.random(1, coaches)
end

-- Each thread walks its own stripe of the id list, so no id is used twice.
local function next_id()
  cursor = cursor + nthreads
  return ids[(cursor % #ids) + 1]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
