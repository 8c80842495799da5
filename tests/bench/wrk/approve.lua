-- wrk script: approves, through the reviewer API, every review id listed
-- (one a line) in BENCH_IDS, then stops. Authorization from BENCH_AUTH.
-- Run it with one thread (-t1). Prints `BENCH_JSON {...}` at the end. When
-- every id has its answer it creates the file BENCH_DONE: wrk itself only
-- ends after -d, so the caller then stops it early with SIGINT.
local ids = {}
local next_i = 1
decided = 0
refused = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(os.getenv("BENCH_IDS")) do
    if line ~= "" then table.insert(ids, line) end
  end
  wrk.headers["Authorization"] = os.getenv("BENCH_AUTH")
  wrk.headers["Content-Type"] = "application/json"
end

local verified = false
local exhausted_at = nil

local function finish()
  local path = os.getenv("BENCH_DONE")
  if path and path ~= "" then
    local f = io.open(path, "w")
    if f then f:write("done\n") f:close() end
  end
  wrk.thread:stop()
end

local function approve(id)
  return wrk.format("POST", "/api/reviews/" .. id .. "/approve", nil, '{"reason":"bench"}')
end

function request()
  -- wrk calls request() once before the run to check the script: that call must not use up an id.
  if not verified then
    verified = true
    return approve(ids[1] or "none")
  end
  local id = ids[next_i]
  next_i = next_i + 1
  if id == nil then
    -- Every id is out: idle connections ask for /healthz until the last answers are in
    -- (or 5 s have passed: a lost answer must not keep the run going).
    exhausted_at = exhausted_at or os.time()
    if os.time() - exhausted_at > 5 then finish() end
    return wrk.format("GET", "/healthz")
  end
  return approve(id)
end

function delay()
  -- Once the ids are used up, the idle connections' /healthz requests are spaced out.
  if exhausted_at then return 50 end
  return 0
end

function response(status, headers, body)
  if status == 200 then
    if body:find('"status":"approved"', 1, true) then decided = decided + 1 end
  else
    refused = refused + 1
  end
  if decided + refused >= #ids then finish() end
end

function done(summary, latency, requests)
  local d, r = 0, 0
  for _, t in ipairs(threads) do
    d = d + t:get("decided")
    r = r + t:get("refused")
  end
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"decided":%d,"refused":%d,"duration_us":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, d, r, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
