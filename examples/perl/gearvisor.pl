# gearvisor's reporting shim for Perl workers: wrap each job in gearvisor_run() and the
# master records a crash in the middle of it (exit, die outside the job, SIGKILL) and its
# errors. Under gearvisor (GEARVISOR_EVENT_FD set) it writes one line to that fd before the
# job (job_started) and one after it (job_ended, or a journal record of the error); elsewhere
# it only runs the job. The journal line must start with exactly
# '{"event": "journal", "records": [' (spaces included): the master forwards such lines.
use strict;
use warnings;
use IO::Handle;
use JSON::PP ();
use MIME::Base64 ();
use Sys::Hostname ();
use Time::HiRes ();

my $gearvisor_fh;  # the event pipe: undef before the first job, 0 when there is none

sub gearvisor_run {
    my ($job, $work) = @_;
    if (!defined $gearvisor_fh) {
        my $n = $ENV{GEARVISOR_EVENT_FD};
        my $fh;
        $gearvisor_fh = (defined $n && $n =~ /^\d+$/ && open($fh, ">&=", $n)) ? $fh : 0;
        $gearvisor_fh->autoflush(1) if $gearvisor_fh;  # one line, one write
    }
    return $work->($job) unless $gearvisor_fh;
    my $json = JSON::PP->new->ascii;
    my $arg = $job->arg;
    print $gearvisor_fh $json->encode({event => "job_started", function => $job->{func},
        handle => $job->handle, unique => "", size => length($arg),
        payload_b64 => MIME::Base64::encode_base64(
            substr($arg, 0, $ENV{GEARVISOR_PAYLOAD_CAP} || 0), "")}), "\n";
    my $started = Time::HiRes::time();
    my $ret = eval { $work->($job) };
    if (my $err = $@) {
        my $record = $json->encode({outcome => "error", function => $job->{func},
            handle => $job->handle, pool => $ENV{GEARVISOR_POOL},
            slot => int($ENV{GEARVISOR_SLOT} || 0), host => Sys::Hostname::hostname(),
            started => $started, seconds => Time::HiRes::time() - $started,
            error_class => "die", error => substr("$err", 0, 1024), decision => "dead"});
        print $gearvisor_fh qq({"event": "journal", "records": [$record]}\n);
        die $err;  # Gearman::Worker sends WORK_EXCEPTION and WORK_FAIL
    }
    print $gearvisor_fh qq({"event": "job_ended"}\n);
    return $ret;
}

1;
