# gearvisor's reporting shim for Perl workers: wrap each job in gearvisor_run() and the
# master records a crash in the middle of it (exit, die outside the job, SIGKILL) and its
# errors. Under gearvisor (GEARVISOR_EVENT_FD set) it writes one line to that fd before the
# job (job_started) and one after it (job_ended, or a journal record of the error); elsewhere
# it only runs the job. The journal line must start with exactly
# '{"event": "journal", "records": [' (spaces included): the master forwards such lines.
# A job that crashed or hung poison_after workers (the master lists it on
# GEARVISOR_POISON_FD) is failed without running, with a journal record of outcome poison.
use strict;
use warnings;
use Digest::SHA ();
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
    # The poison key (Gearman::Worker never sees the unique; handles repeat across gearmand
    # restarts and servers, so the payload's digest is in it): see gearvisor.php.
    my $key = Digest::SHA::sha1_hex("$job->{func}\0h\0" . $job->handle . "\0"
                                    . Digest::SHA::sha1_hex($arg));
    print $gearvisor_fh $json->encode({event => "job_started", function => $job->{func},
        handle => $job->handle, unique => "", size => length($arg), key => $key,
        payload_b64 => MIME::Base64::encode_base64(
            substr($arg, 0, $ENV{GEARVISOR_PAYLOAD_CAP} || 0), "")}), "\n";
    my $started = Time::HiRes::time();
    if (gearvisor_poisoned($key)) {
        my $why = "refused without running: it crashed or hung poison_after workers already";
        gearvisor_record($job, "poison", $started, "Poison", $why);
        die "$why\n";  # Gearman::Worker sends WORK_FAIL
    }
    my $ret = eval { $work->($job) };
    if (my $err = $@) {
        gearvisor_record($job, "error", $started, "die", "$err");
        die $err;  # Gearman::Worker sends WORK_EXCEPTION and WORK_FAIL
    }
    print $gearvisor_fh qq({"event": "job_ended"}\n);
    return $ret;
}

# The journal line of a job that failed: the master fills in its payload and decision.
sub gearvisor_record {
    my ($job, $outcome, $started, $class, $error) = @_;
    my $record = JSON::PP->new->ascii->encode({outcome => $outcome,
        function => $job->{func}, handle => $job->handle, pool => $ENV{GEARVISOR_POOL},
        slot => int($ENV{GEARVISOR_SLOT} || 0), host => Sys::Hostname::hostname(),
        started => $started, seconds => Time::HiRes::time() - $started,
        error_class => $class, error => substr($error, 0, 1024), decision => "dead"});
    print $gearvisor_fh qq({"event": "journal", "records": [$record]}\n);
}

# Is the job of this key on the master's poison list (a file of 40-hex-digit lines it
# appends to)? One fstat per job, a read when it changed.
my ($gearvisor_list, $gearvisor_seen, %gearvisor_poison);  # undef: not looked yet, 0: none
sub gearvisor_poisoned {
    my ($key) = @_;
    if (!defined $gearvisor_list) {
        my $n = $ENV{GEARVISOR_POISON_FD};
        my $fh;
        $gearvisor_list = (defined $n && $n =~ /^\d+$/ && open($fh, "<&=", $n)) ? $fh : 0;
    }
    return 0 unless $gearvisor_list;
    my ($size, $mtime) = (stat($gearvisor_list))[7, 9];
    return 0 unless $size;
    if (($gearvisor_seen // "") ne "$size $mtime") {
        # (this worker's own open of the list: the offset is nobody else's)
        %gearvisor_poison = ();
        if (seek($gearvisor_list, 0, 0)) {
            local $/;
            %gearvisor_poison = map { $_ => 1 } split /\n/, (readline($gearvisor_list) // "");
        }
        $gearvisor_seen = "$size $mtime";
    }
    return exists $gearvisor_poison{$key};
}

1;
