-- Whole GETs of random small files /s0.bin .. /s{N-1}.bin (N from SMALL_COUNT).
local n = tonumber(os.getenv("SMALL_COUNT") or "200")

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
end

request = function()
  return wrk.format("GET", "/s" .. math.random(0, n - 1) .. ".bin")
end
