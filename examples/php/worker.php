<?php
// An example PHP worker (php-gearman's GearmanWorker) for a gearvisor command pool.
//
// gearvisor passes GEARVISOR_SERVERS ("host:port,host:port"), GEARVISOR_POOL, GEARVISOR_SLOT
// and GEARVISOR_CLIENT_ID (send it with setId() so `ready: registered` can see this worker).
// It stops the worker with stop_signal / reload_signal (SIGTERM here): the handler only
// records it, the current job finishes, and the loop exits between jobs.
//
// Each job runs through gearvisor_run() (gearvisor.php, beside this file): under gearvisor
// it reports the job on GEARVISOR_EVENT_FD, so a crash in the middle of a job and a job's
// error are recorded in gearvisor's job journal (README: Failed jobs).
//
// Functions:
//   php_reverse  returns the payload reversed
//   php_slow     sleeps for the payload's seconds (a float), then returns "slept"
//   php_record   appends "<unique> <VERSION> <pid>" to $RESULTS, returns VERSION
//   php_crash    exits the process (a crash) without answering; libgearman's cleanup at
//                exit still sends WORK_FAIL, so gearmand drops the job
//   php_kill     kills the process (SIGKILL) mid-job: gearmand hands the job out again
//   php_kill_once  the same the first time a unique comes (it leaves a file beside
//                $RESULTS), then returns "ok after a crash"
//   php_fail     fails (an exception, recorded as an error) with "cannot do <payload>"
//   php_flaky    fails its first run and succeeds when gearvisor retries it (`retry:`;
//                gearvisor_attempt() reads a retry's attempt), returning "ok on attempt
//                <n> of <unique>"; appends "<unique> attempt <n>" to $RESULTS

require __DIR__ . "/gearvisor.php";

const VERSION = "php-v1";

pcntl_async_signals(true);
$stop = false;
foreach ([SIGTERM, SIGHUP, SIGINT] as $sig) {
    pcntl_signal($sig, function () use (&$stop) { $stop = true; });
}

$worker = new GearmanWorker();
foreach (explode(",", getenv("GEARVISOR_SERVERS") ?: "127.0.0.1:4730") as $server) {
    [$host, $port] = explode(":", $server);
    $worker->addServer($host, (int)$port);
}
if (getenv("GEARVISOR_CLIENT_ID")) {
    $worker->setId(getenv("GEARVISOR_CLIENT_ID"));
}
$worker->addOptions(GEARMAN_WORKER_NON_BLOCKING);
$worker->setTimeout(200);  // ms: wake up to notice a stop signal

// Every function runs through the reporting shim.
function serve(GearmanWorker $worker, string $name, callable $work): void
{
    $worker->addFunction($name, fn (GearmanJob $job) => gearvisor_run($job, $work));
}

serve($worker, "php_reverse", function (GearmanJob $job) {
    return strrev($job->workload());
});
serve($worker, "php_slow", function (GearmanJob $job) {
    // A signal interrupts usleep(); sleep on until the job's time is up: a stop lets the
    // current job finish.
    $end = microtime(true) + floatval($job->workload());
    while (($left = $end - microtime(true)) > 0) {
        usleep((int)($left * 1e6));
    }
    return "slept";
});
serve($worker, "php_record", function (GearmanJob $job) {
    $results = getenv("RESULTS");
    if ($results) {
        file_put_contents($results, $job->unique() . " " . VERSION . " " . getmypid() . "\n",
                          FILE_APPEND | LOCK_EX);
    }
    return VERSION;
});
serve($worker, "php_crash", function (GearmanJob $job) {
    exit(3);
});
serve($worker, "php_kill", function (GearmanJob $job) {
    posix_kill(getmypid(), SIGKILL);
});
serve($worker, "php_kill_once", function (GearmanJob $job) {
    $mark = getenv("RESULTS") . ".killed-" . md5($job->unique());
    if (!file_exists($mark)) {
        touch($mark);
        posix_kill(getmypid(), SIGKILL);
    }
    return "ok after a crash";
});
serve($worker, "php_fail", function (GearmanJob $job) {
    throw new RuntimeException("cannot do " . $job->workload());
});
serve($worker, "php_flaky", function (GearmanJob $job) {
    [$unique, $attempt] = gearvisor_attempt($job);  // (the shim's: "gv:..." uniques parsed)
    if (getenv("RESULTS")) {
        file_put_contents(getenv("RESULTS"), "$unique attempt $attempt\n", FILE_APPEND | LOCK_EX);
    }
    if ($attempt < 2) {
        throw new RuntimeException("flaky: the first run of $unique fails");
    }
    return "ok on attempt $attempt of $unique";
});

fwrite(STDERR, "php worker " . getmypid() . " serving " . getenv("GEARVISOR_POOL")
       . "[" . getenv("GEARVISOR_SLOT") . "]\n");
while (!$stop) {
    if (@$worker->work()) {
        continue;
    }
    $code = $worker->returnCode();
    if ($code == GEARMAN_IO_WAIT || $code == GEARMAN_NO_JOBS) {
        @$worker->wait();  // returns at setTimeout or when a job may be there
        continue;
    }
    if ($code != GEARMAN_SUCCESS && $code != GEARMAN_TIMEOUT) {
        fwrite(STDERR, "gearman error: " . $worker->error() . "\n");
        usleep(200000);
    }
}
fwrite(STDERR, "php worker " . getmypid() . " stopping\n");
exit(0);
