-- wrk script: POST one delivery, read from the files wrk is pointed at
-- through the environment (BENCH_AUTH_FILE, BENCH_BODY_FILE).
local function slurp(path)
	local f = assert(io.open(path, "rb"))
	local s = f:read("*a")
	f:close()
	return s
end

wrk.method = "POST"
wrk.body = slurp(os.getenv("BENCH_BODY_FILE"))
wrk.headers["Authorization"] = (slurp(os.getenv("BENCH_AUTH_FILE")):gsub("%s+$", ""))
wrk.headers["User-Agent"] = "Trivial Security"

-- wrk counts answers other than 2xx and 3xx as status errors: print them,
-- so that a run of refusals is never taken for speed.
function done(summary, latency, requests)
	io.write(string.format("non2xx %d\n", summary.errors.status))
end
