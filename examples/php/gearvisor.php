<?php
// gearvisor's reporting shim for PHP workers: wrap each job in gearvisor_run() and the
// master records a crash in the middle of it (exit, fatal error, SIGKILL) and its errors.
// Under gearvisor (GEARVISOR_EVENT_FD set) it writes one line to that fd before the job
// (job_started) and one after it (job_ended, or a journal record of the error); elsewhere
// it only runs the job. The journal line must start with exactly
// '{"event": "journal", "records": [' (spaces included): the master forwards such lines.

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
    fwrite($fd, json_encode(["event" => "job_started", "function" => $job->functionName(),
        "handle" => $job->handle(), "unique" => $job->unique(),
        "payload_b64" => base64_encode(substr($payload, 0, $cap)),
        "size" => strlen($payload)], $flags) . "\n");
    $started = microtime(true);
    try {
        $result = $work($job);
    } catch (Throwable $e) {
        $record = ["outcome" => "error", "function" => $job->functionName(),
            "unique" => $job->unique(), "handle" => $job->handle(),
            "pool" => getenv("GEARVISOR_POOL"), "slot" => (int)getenv("GEARVISOR_SLOT"),
            "host" => gethostname(), "started" => $started,
            "seconds" => microtime(true) - $started, "error_class" => get_class($e),
            "error" => substr($e->getMessage(), 0, 1024), "decision" => "dead"];
        fwrite($fd, '{"event": "journal", "records": [' . json_encode($record, $flags) . "]}\n");
        $job->sendFail();  // the client hears of it (WORK_FAIL)
        return null;
    }
    fwrite($fd, "{\"event\": \"job_ended\"}\n");
    return $result;
}
