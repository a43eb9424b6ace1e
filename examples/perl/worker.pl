#!/usr/bin/perl
# An example Perl worker (Gearman::Worker) for a gearvisor command pool.
#
# gearvisor passes GEARVISOR_SERVERS ("host:port,..."), GEARVISOR_POOL, GEARVISOR_SLOT and
# GEARVISOR_CLIENT_ID (sent as client_id so `ready: registered` can see this worker). On
# SIGTERM (stop_signal / reload_signal) the current job finishes and the loop ends before
# the next one.
#
# Each job runs through gearvisor_run() (gearvisor.pl, beside this file): under gearvisor
# it reports the job on GEARVISOR_EVENT_FD, so a crash in the middle of a job and a job's
# error are recorded in gearvisor's job journal (README: Failed jobs).
#
# Functions:
#   perl_upper   returns the payload upper-cased
#   perl_slow    sleeps for the payload's seconds, then returns "slept"
#   perl_record  appends "<unique> <VERSION> <pid>" to $RESULTS, returns VERSION
#   perl_crash   exits the process (a crash) without answering
#   perl_fail    fails (dies, recorded as an error) with "cannot do <payload>"
use strict;
use warnings;
use Gearman::Worker;
use Time::HiRes qw(sleep);
use FindBin ();
require "$FindBin::Bin/gearvisor.pl";

my $VERSION = "perl-v1";
my $stop = 0;
$SIG{TERM} = $SIG{HUP} = $SIG{INT} = sub { $stop = 1 };

my @servers = split /,/, ($ENV{GEARVISOR_SERVERS} || "127.0.0.1:4730");
my $worker = Gearman::Worker->new(
    job_servers => \@servers,
    ($ENV{GEARVISOR_CLIENT_ID} ? (client_id => $ENV{GEARVISOR_CLIENT_ID}) : ()),
);
# Every function runs through the reporting shim.
sub serve {
    my ($name, $work) = @_;
    $worker->register_function($name => sub { gearvisor_run($_[0], $work) });
}
serve(perl_upper => sub { uc $_[0]->arg });
serve(perl_slow => sub {
    # A signal interrupts sleep(); sleep on until the job's time is up.
    my $end = Time::HiRes::time() + $_[0]->arg;
    while ((my $left = $end - Time::HiRes::time()) > 0) { sleep($left) }
    "slept";
});
serve(perl_record => sub {
    my $job = shift;
    if (my $results = $ENV{RESULTS}) {
        open(my $fh, ">>", $results) or die "cannot open $results: $!";
        print $fh join(" ", $job->handle, $VERSION, $$), "\n";
        close $fh;
    }
    $VERSION;
});
serve(perl_crash => sub { exit 3 });
serve(perl_fail => sub { die "cannot do " . $_[0]->arg . "\n" });

$| = 1;
print STDERR "perl worker $$ serving $ENV{GEARVISOR_POOL}\[$ENV{GEARVISOR_SLOT}\]\n";
$worker->work(
    stop_if => sub { $stop },  # checked between jobs and on each idle wake-up
    on_complete => sub { },
) while !$stop;
print STDERR "perl worker $$ stopping\n";
exit 0;
