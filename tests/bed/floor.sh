# The floor for `clusterctl create`: the same VMs booted again from nothing and the same
# Kubernetes started on them by a bare script (virsh, qemu-img, OpenSSH, tar), with none of
# clusterctl's checks, so the benchmark can say how far clusterctl is from the least work there is.
# Sourced by cli-e2e.sh (phase `bench`) after clusterctl created the cluster; uses its variables
# ($bin, $name, $machines, $bundle, $work, $virsh, $CLUSTERCTL_STATE_DIR) and functions (log, die).
#
#   floor_capture   reads, from the running cluster, what clusterctl put on each machine: the file
#                   tree it wrote (units, configs, PKI, kubeconfigs) and which binaries and image
#                   archives it uploaded
#   floor_reset     stops every machine and gives it a fresh root overlay and an empty data disk:
#                   what `create` starts from, minus defining the domains. The seed disk (hostname,
#                   address, host keys) and the network are kept, so each machine comes back as
#                   itself with the same pinned host key
#   floor_run       boots them and brings Kubernetes up as clusterctl does, in the same order, and
#                   writes the seconds of each step to $work/floor/times
#
# The control-plane units, in the order clusterctl's templates start them
# (templates/src/kubernetes.rs): through the API server, then the rest once /readyz answers.
FLOOR_BASE_UNITS="systemd-modules-load systemd-sysctl containerd clusterctl-pod-network"
FLOOR_CP_FIRST="etcd kube-apiserver"
FLOOR_CP_REST="kube-controller-manager kube-scheduler kubelet kube-proxy"
FLOOR_WORKER_UNITS="kubelet kube-proxy"
FLOOR_KUBECTL="/var/lib/clusterctl/bin/kubectl --kubeconfig /var/lib/clusterctl/kubernetes/admin.conf --request-timeout=20s"
# What clusterctl writes outside its bin and image directories (templates/src/kubernetes.rs).
FLOOR_TREE="etc/modules-load.d/clusterctl-kubernetes.conf etc/sysctl.d/90-clusterctl-kubernetes.conf etc/containerd/config.toml etc/cni/net.d var/lib/clusterctl/kubernetes"

fl_now() { date +%s.%N; }
fl_secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

fl_ip() {
  jq -r --arg m "$1" '.machines[] | select(.name == $m) | .addresses[0].address' "$CLUSTERCTL_STATE_DIR/$name/cluster.json"
}

# Plain OpenSSH with clusterctl's client key and the pinned host keys, never trust-on-first-use.
fl_ssh() {
  local ip=$1; shift
  ssh -q -i "$CLUSTERCTL_STATE_DIR/$name/ssh-client-key" -o IdentitiesOnly=yes -o BatchMode=yes \
    -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$work/floor/known_hosts" \
    -o ConnectTimeout=5 -o ServerAliveInterval=15 "core@$ip" "$@"
}

floor_capture() {
  local m ip units u
  mkdir -p "$work/floor"
  : > "$work/floor/known_hosts"
  for m in $machines; do
    ip=$(fl_ip "$m")
    echo "$ip $(jq -r --arg m "$m" '.ssh_host_keys[$m]' "$CLUSTERCTL_STATE_DIR/$name/cluster.json")" >> "$work/floor/known_hosts"
  done
  for m in $machines; do
    ip=$(fl_ip "$m")
    units=""
    for u in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy clusterctl-pod-network; do
      fl_ssh "$ip" test -f "/etc/systemd/system/$u.service" && units="$units etc/systemd/system/$u.service"
    done
    # shellcheck disable=SC2086 # word lists
    fl_ssh "$ip" sudo -n tar --ignore-failed-read -C / -cf - $FLOOR_TREE $units > "$work/floor/$m-tree.tar" \
      || die "floor: cannot read what clusterctl wrote on $m"
    fl_ssh "$ip" ls /var/lib/clusterctl/bin > "$work/floor/$m-bins" || die "floor: no binaries on $m"
    fl_ssh "$ip" ls /var/lib/clusterctl/images > "$work/floor/$m-images" || die "floor: no image archives on $m"
    chmod 600 "$work/floor/$m-tree.tar"
  done
  log "floor: captured $(du -ch "$work"/floor/*-tree.tar | tail -1 | cut -f1) of configuration and PKI from $(wc -w <<< "$machines") machines"
}

floor_reset() {
  local m root data info pool
  # The machines' disks are volumes of the cluster's pool (providers/src/libvirt/names.rs).
  pool=clusterctl-$(cluster_id)
  for m in $machines; do
    $virsh destroy "$m" > /dev/null
    root=$($virsh vol-path --pool "$pool" "$m-root.qcow2")
    data=$($virsh vol-path --pool "$pool" "$m-data.qcow2")
    [ -f "$root" ] && [ -f "$data" ] || die "floor: cannot find the disks of $m in pool $pool"
    info=$(qemu-img info -U --output=json "$root")
    qemu-img create -q -f qcow2 -F "$(jq -r '."backing-filename-format"' <<< "$info")" \
      -b "$(jq -r '."backing-filename"' <<< "$info")" "$root" "$(jq -r '."virtual-size"' <<< "$info")"
    qemu-img create -q -f qcow2 "$data" "$(qemu-img info -U --output=json "$data" | jq -r '."virtual-size"')"
  done
  log "floor: $(wc -w <<< "$machines") machines stopped, root overlays and data disks recreated empty"
}

# Runs "$@" once per machine in parallel (the machine's name and address appended), fails if any did.
fl_each() {
  local m pids=() rc=0 p
  for m in $FL_ON; do "$@" "$m" "$(fl_ip "$m")" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  return $rc
}

fl_wait_ssh() {
  local m=$1 ip=$2 end=$((SECONDS + 1500))
  until fl_ssh "$ip" true 2> /dev/null; do
    [ $SECONDS -lt $end ] || { echo "floor: $m never answered ssh" >&2; return 1; }
    sleep 2
  done
}

fl_install() {
  local m=$1 ip=$2 files=() f
  for f in $(cat "$work/floor/$m-bins"); do files+=("bin/$f"); done
  for f in $(cat "$work/floor/$m-images"); do
    [ -f "$bundle/images/$f" ] || { echo "floor: $bundle/images/$f not found" >&2; return 1; }
    files+=("images/$f")
  done
  tar -h -C "$bundle" -cf - "${files[@]}" | fl_ssh "$ip" 'sudo -n mkdir -p /var/lib/clusterctl && sudo -n tar -C /var/lib/clusterctl -xf -' || return 1
  fl_ssh "$ip" 'sudo -n tar -C / -xf -' < "$work/floor/$m-tree.tar" || return 1
  fl_ssh "$ip" 'sudo -n sh -c "for f in /var/lib/clusterctl/images/*; do ctr -n k8s.io images import \$f > /dev/null || exit 1; done"'
}

fl_restart() {
  local ip=$1; shift
  fl_ssh "$ip" "sudo -n sh -c 'systemctl daemon-reload && for u in $*; do systemctl restart \$u || exit 1; done'"
}

fl_start_worker() { fl_restart "$2" $FLOOR_BASE_UNITS $FLOOR_WORKER_UNITS; }

floor_run() {
  local cp=$name-cp-0 cpip t0 t1 end n
  cpip=$(fl_ip "$cp")
  : > "$work/floor/times"
  t0=$(fl_now)
  for m in $machines; do $virsh start "$m" > /dev/null; done
  FL_ON=$machines fl_each fl_wait_ssh || die "floor: a machine did not boot"
  t1=$(fl_now); echo "boot $(fl_secs "$t0" "$t1")" >> "$work/floor/times"; t0=$t1
  FL_ON=$machines fl_each fl_install || die "floor: installing failed"
  t1=$(fl_now); echo "install $(fl_secs "$t0" "$t1")" >> "$work/floor/times"; t0=$t1
  # shellcheck disable=SC2086 # word lists
  fl_restart "$cpip" $FLOOR_BASE_UNITS $FLOOR_CP_FIRST || die "floor: starting etcd and the API server failed"
  end=$((SECONDS + 1200))
  until fl_ssh "$cpip" "sudo -n $FLOOR_KUBECTL get --raw=/readyz" > /dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "floor: /readyz never answered"
    sleep 2
  done
  # shellcheck disable=SC2086
  fl_restart "$cpip" $FLOOR_CP_REST || die "floor: starting the other control-plane units failed"
  t1=$(fl_now); echo "control-plane $(fl_secs "$t0" "$t1")" >> "$work/floor/times"; t0=$t1
  FL_ON=$(tr ' ' '\n' <<< "$machines" | grep -vx "$cp" | xargs) fl_each fl_start_worker || die "floor: starting the workers failed"
  t1=$(fl_now); echo "workers $(fl_secs "$t0" "$t1")" >> "$work/floor/times"; t0=$t1
  end=$((SECONDS + 900))
  while :; do
    n=$(fl_ssh "$cpip" "sudo -n $FLOOR_KUBECTL get nodes -o json" 2> /dev/null \
      | jq '[.items[] | select(any(.status.conditions[]; .type == "Ready" and .status == "True"))] | length' 2> /dev/null || echo 0)
    [ "${n:-0}" -eq "$(wc -w <<< "$machines")" ] && break
    [ $SECONDS -lt $end ] || die "floor: only ${n:-0} nodes became Ready"
    sleep 2
  done
  t1=$(fl_now); echo "ready $(fl_secs "$t0" "$t1")" >> "$work/floor/times"
  log "floor: $(wc -w <<< "$machines") nodes Ready: $(tr '\n' ' ' < "$work/floor/times")"
}

# clusterctl's create log ($1, total wall seconds $2) next to the floor, bucketed the same way.
floor_report() {
  local log=$1 total=$2
  awk -v total="$total" -v floorfile="$work/floor/times" '
    BEGIN { while ((getline l < floorfile) > 0) { split(l, f, " "); fl[f[1]] = f[2]; ftotal += f[2] } }
    /^==> / { title = substr($0, 5) }
    /^    done in [0-9.]+ s$/ {
      s = $3
      if (title ~ /certificates|Installing/) b = "install"
      else if (title ~ /control plane/) b = "control-plane"
      else if (title ~ /on the workers/) b = "workers"
      else if (title ~ /node to be Ready/) b = "ready"
      else next
      cc[b] += s; counted += s
    }
    END {
      cc["boot"] = total - counted
      split("boot install control-plane workers ready", order, " ")
      label["boot"] = "verify, create machines, boot to SSH"
      label["install"] = "certificates, install binaries/config/images"
      label["control-plane"] = "etcd + API server to /readyz, then the rest"
      label["workers"] = "kubelet + kube-proxy on the workers"
      label["ready"] = "all nodes Ready"
      printf "bench: %-46s %11s %8s %7s\n", "phase", "clusterctl", "floor", "ratio"
      for (i = 1; i <= 5; i++) {
        k = order[i]
        printf "bench: %-46s %9.1f s %6.1f s %7.2f\n", label[k], cc[k], fl[k], (fl[k] > 0 ? cc[k] / fl[k] : 0)
      }
      printf "bench: %-46s %9.1f s %6.1f s %7.2f\n", "total", total, ftotal, total / ftotal
    }' "$log"
}
