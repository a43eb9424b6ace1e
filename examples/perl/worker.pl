#!/usr/bin/perl
# An example Perl worker (Gearman::Worker) for a gearvisor command pool.
#
# gearvisor passes GEARVISOR_SERVERS ("host:port,..."), GEARVISOR_POOL, GEARVISOR_SLOT and
# GEARVISOR_CLIENT_ID (sent as client_id so `ready: registered` can see this worker). On
# SIGTERM (stop_signal / reload_signal) the current job finishes and the loop ends before
# the next one.
#
# Functions:
#   perl_upper   returns the payload upper-cased
#   perl_slow    sleeps for the payload's seconds, then returns "slept"
#   perl_record  appends "<unique> <VERSION> <pid>" to $RESULTS, returns VERSION
use strict;
use warnings;
use Gearman::Worker;
use Time::HiRes qw(sleep);

my $VERSION = "perl-v1";
my $stop = 0;
$SIG{TERM} = $SIG{HUP} = $SIG{INT} = sub { $stop = 1 };

my @servers = split /,/, ($ENV{GEARVISOR_SERVERS} || "127.0.0.1:4730");
my $worker = Gearman::Worker->new(
    job_servers => \@servers,
    ($ENV{GEARVISOR_CLIENT_ID} ? (client_id => $ENV{GEARVISOR_CLIENT_ID}) : ()),
);
$worker->register_function(perl_upper => sub { uc $_[0]->arg });
$worker->register_function(perl_slow => sub {
    # A signal interrupts sleep(); sleep on until the job's time is up.
    my $end = Time::HiRes::time() + $_[0]->arg;
    while ((my $left = $end - Time::HiRes::time()) > 0) { sleep($left) }
    "slept";
});
$worker->register_function(perl_record => sub {
    my $job = shift;
    if (my $results = $ENV{RESULTS}) {
        open(my $fh, ">>", $results) or die "cannot open $results: $!";
        print $fh join(" ", $job->handle, $VERSION, $$), "\n";
        close $fh;
    }
    $VERSION;
});

$| = 1;
print STDERR "perl worker $$ serving $ENV{GEARVISOR_POOL}\[$ENV{GEARVISOR_SLOT}\]\n";
$worker->work(
    stop_if => sub { $stop },  # checked between jobs and on each idle wake-up
    on_complete => sub { },
) while !$stop;
print STDERR "perl worker $$ stopping\n";
exit 0;
