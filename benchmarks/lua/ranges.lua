-- Random Range requests over one object. Environment:
--   OBJ_PATH  request path (e.g. /1g.bin)    OBJ_SIZE  object size in bytes
--   MODE      "aligned" (1 MiB block-aligned 1 MiB ranges) or "random" (4 KiB - 4 MiB, unaligned)
local path = os.getenv("OBJ_PATH")
local size = tonumber(os.getenv("OBJ_SIZE"))
local mode = os.getenv("MODE") or "aligned"
local MiB = 1048576

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
end

request = function()
  local a, b
  if mode == "aligned" then
    local i = math.random(0, math.floor(size / MiB) - 1)
    a = i * MiB
    b = a + MiB - 1
  else
    local len = math.random(4096, 4 * MiB)
    a = math.random(0, size - len)
    b = a + len - 1
  end
  return wrk.format("GET", path, { ["Range"] = "bytes=" .. a .. "-" .. b })
end
