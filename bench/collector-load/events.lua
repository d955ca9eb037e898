-- wrk script: every request POSTs a valid JSON events.v1.EventBatch of N events to /v1/events.
--
--   wrk -s events.lua URL -- N [QUERY]      e.g. -- 100   or   -- 100 ?wait=acked
--
-- Event ids are unique across the run: "<wrk start>-<thread>-<request>-<index>", so no event is a
-- duplicate, within a batch or of another. Each event is a player heartbeat of one of 10,000
-- users (about 230 bytes of JSON, 110 as protobuf), spread over the stream's shards by user id.
-- COLLECTOR_KEY, when set, is sent as `Authorization: Bearer <key>` with every request.

local threads = {}
local next_thread = 0
local run = tostring(os.time())

function setup(thread)
  thread:set("thread_id", next_thread)
  next_thread = next_thread + 1
  table.insert(threads, thread)
end

function init(args)
  events_per_request = tonumber(args[1] or "10")
  query = args[2] or ""
  counter = 0
  -- occurredAtMs: wrk's start, in milliseconds (the collector takes events up to 7 days old).
  now_ms = string.format("%d", os.time() * 1000)
  prefix = "w" .. run .. "-" .. thread_id .. "-"
  wrk.method = "POST"
  wrk.path = "/v1/events" .. query
  wrk.headers["Content-Type"] = "application/json"
  local key = os.getenv("COLLECTOR_KEY")
  if key ~= nil and key ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. key
  end
end

function request()
  counter = counter + 1
  local parts = {}
  for i = 1, events_per_request do
    local user = (counter * events_per_request + i + thread_id * 7919) % 10000
    parts[i] = '{"eventId":"' .. prefix .. counter .. "-" .. i ..
      '","type":"EVENT_TYPE_HEARTBEAT","occurredAtMs":"' .. now_ms ..
      '","userId":"user-' .. user .. '","deviceId":"device-' .. user ..
      '","sessionId":"session-' .. user .. '","platform":"PLATFORM_WEB","appVersion":"5.12.0"' ..
      ',"contentId":"content-000042","positionMs":"' .. (counter * 1000) .. '","durationMs":"5400000"}'
  end
  return wrk.format(nil, nil, nil, '{"events":[' .. table.concat(parts, ",") .. ']}')
end
