<?php
// gearvisor's reporting shim for PHP workers: wrap each job in gearvisor_run() and the
// master records a crash in the middle of it (exit, fatal error, SIGKILL) and its errors.
// Under gearvisor (GEARVISOR_EVENT_FD set) it writes one line to that fd before the job
// (job_started) and one after it (job_ended, or a journal record of the error); elsewhere
// it only runs the job. The journal line must start with exactly
// '{"event": "journal", "records": [' (spaces included): the master forwards such lines.
// A job that crashed or hung poison_after workers (the master lists it on
// GEARVISOR_POISON_FD) is failed without running, with a journal record of outcome poison.

function gearvisor_run(GearmanJob $job, callable $work)
{
    static $fd = false;  // the event pipe: false before the first job, null when none
    if ($fd === false) {
        $n = getenv("GEARVISOR_EVENT_FD");
        $fd = ($n !== false && ctype_digit($n)) ? (@fopen("php://fd/$n", "wb") ?: null) : null;
    }
    if ($fd === null) {
        return $work($job);
    }
    $flags = JSON_INVALID_UTF8_SUBSTITUTE | JSON_UNESCAPED_SLASHES;
    $payload = $job->workload();
    $cap = (int)getenv("GEARVISOR_PAYLOAD_CAP");
    $key = gearvisor_key($job, $payload);
    fwrite($fd, json_encode(["event" => "job_started", "function" => $job->functionName(),
        "handle" => $job->handle(), "unique" => $job->unique(),
        "payload_b64" => base64_encode(substr($payload, 0, $cap)),
        "size" => strlen($payload), "key" => $key], $flags) . "\n");
    $started = microtime(true);
    if (gearvisor_poisoned($key)) {
        gearvisor_record($fd, $job, "poison", $started, "Poison", "refused without running: "
            . "it crashed or hung poison_after workers already");
        $job->sendFail();  // the client hears of it (WORK_FAIL)
        return null;
    }
    static $hooked = false;
    if (!$hooked) {
        register_shutdown_function("gearvisor_exited");
        $hooked = true;
    }
    $GLOBALS["gearvisor_running"] = [$fd, $job, $started];  // (for gearvisor_exited)
    try {
        $result = $work($job);
    } catch (Throwable $e) {
        $GLOBALS["gearvisor_running"] = null;
        gearvisor_record($fd, $job, "error", $started, get_class($e), $e->getMessage());
        $job->sendFail();
        return null;
    }
    $GLOBALS["gearvisor_running"] = null;
    fwrite($fd, "{\"event\": \"job_ended\"}\n");
    return $result;
}

// exit() or a fatal error in the middle of a job: libgearman fails the job (WORK_FAIL) as
// the worker shuts down, so gearmand drops it instead of handing it out again. Recorded
// as a crash that is over (a dead letter, or retried with `retry:`), not one gearmand
// will run again, as the master would record a death it saw on its own.
function gearvisor_exited(): void
{
    $running = $GLOBALS["gearvisor_running"] ?? null;
    if ($running === null) {
        return;
    }
    [$fd, $job, $started] = $running;
    $e = error_get_last();
    $fatal = $e !== null && ($e["type"] & (E_ERROR | E_CORE_ERROR | E_COMPILE_ERROR
                                           | E_USER_ERROR | E_RECOVERABLE_ERROR)) !== 0;
    gearvisor_record($fd, $job, "crash", $started, $fatal ? "FatalError" : "Exit",
        ($fatal ? "fatal error in the middle of the job: " . $e["message"]
                : "exit() in the middle of the job")
        . " (libgearman failed the job as the worker exited: gearmand dropped it)");
}

// [the client's unique, the attempt] of a job: a retry or replay gearvisor submitted has
// the unique "gv:<failure id>:<attempt>:<unique>" (the unique is left off when it does not
// fit gearmand's 64 bytes); any other job is [its unique, 1].
function gearvisor_attempt(GearmanJob $job): array
{
    $unique = $job->unique();
    if (preg_match('/^gv:([0-9]+):([0-9]+):(.*)$/s', $unique, $m)
            && (int)$m[2] >= 1 && (int)$m[2] <= 1000000) {
        return [$m[3], (int)$m[2]];
    }
    return [$unique, 1];
}

// The journal line of a job that failed: the master fills in its payload, attempt and retry
// decision.
function gearvisor_record($fd, GearmanJob $job, string $outcome, float $started,
                          string $class, string $error): void
{
    $record = ["outcome" => $outcome, "function" => $job->functionName(),
        "unique" => $job->unique(), "handle" => $job->handle(),
        "pool" => getenv("GEARVISOR_POOL"), "slot" => (int)getenv("GEARVISOR_SLOT"),
        "host" => gethostname(), "started" => $started,
        "seconds" => microtime(true) - $started, "error_class" => $class,
        "error" => substr($error, 0, 1024), "decision" => "dead"];
    $flags = JSON_INVALID_UTF8_SUBSTITUTE | JSON_UNESCAPED_SLASHES;
    fwrite($fd, '{"event": "journal", "records": [' . json_encode($record, $flags) . "]}\n");
}

// The job's poison key, sent with job_started and listed by the master when workers keep
// dying on it: the SHA-1 of "<function>\0u\0<unique>", or for a job without a unique of
// "<function>\0h\0<handle>\0<hex SHA-1 of the payload>" (handles repeat across gearmand
// restarts and servers).
function gearvisor_key(GearmanJob $job, string $payload): string
{
    $name = $job->unique() !== "" ? "u\0" . $job->unique()
                                  : "h\0" . $job->handle() . "\0" . sha1($payload);
    return sha1($job->functionName() . "\0" . $name);
}

// Is the job of this key on the master's poison list (a file of 40-hex-digit lines it
// appends to)? One fstat per job, a read when it changed.
function gearvisor_poisoned(string $key): bool
{
    static $list = false;  // the inherited fd: false before the first job, null when none
    static $seen = null;   // [size, mtime] when it was last read
    static $keys = [];
    if ($list === false) {
        $n = getenv("GEARVISOR_POISON_FD");
        $list = ($n !== false && ctype_digit($n)) ? (@fopen("php://fd/$n", "rb") ?: null) : null;
    }
    $st = $list === null ? false : @fstat($list);
    if ($st === false || $st["size"] === 0) {
        return false;
    }
    if ($seen !== [$st["size"], $st["mtime"]]) {
        // (this worker's own open of the list: the offset is nobody else's)
        $text = @rewind($list) ? stream_get_contents($list) : false;
        $keys = $text === false ? [] : array_flip(explode("\n", $text));
        $seen = [$st["size"], $st["mtime"]];
    }
    return isset($keys[$key]);
}
