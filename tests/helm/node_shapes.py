"""Node shapes the value sets are sized for, and what Kubernetes leaves a pod on them (docs/deploy.md 1.1 lists the
same figures with their sources; test_chart_node_fit.py keeps the two equal).

Allocatable = capacity - kube/system reservation - eviction threshold, per the providers' published rules:
- GKE (cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes): CPU 6 % of the first core, 1 % of the
  next, 0.5 % of the next two, 0.25 % above four; memory 25 % of the first 4 GiB, 20 % of the next 4, 10 % of the
  next 8, 6 % of the next 112, plus a 100 MiB eviction threshold; ephemeral storage: the page's own example, a
  100 GB boot disk leaving 47060071478 bytes (43.8 GiB) allocatable.
- EKS (amazon-eks-ami, AL2023 nodeadm): CPU as GKE; memory 255 MiB + 11 MiB per pod of the instance's max-pods
  (eni-max-pods.txt) plus 100 MiB eviction; ephemeral storage: 1 GiB kube-reserved plus the 10 % nodefs eviction
  threshold, of a root volume of `disk_gib` (Karpenter's AL2023 default is 20 GiB: docs/deploy.md asks for 100).
On top, the daemonsets (kube-proxy, CNI, CSI, logging; on GPU nodes also the device plugin, GPU feature discovery
and dcgm-exporter) and, on disk, the ~20 GB image every Ray pod pulls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_GIB = 20.0
DAEMONSETS = {False: (0.4, 1.0), True: (0.6, 1.5)}  # (CPU, GiB) by "has GPUs"
GKE_100GB_EPHEMERAL_GIB = 47060071478 / 2**30


@dataclass(frozen=True)
class Shape:
    name: str
    cloud: str  # gke | eks
    vcpu: int
    mem_gib: float
    gpus: int = 0
    gpu: str = ""  # product name
    gpu_mib: int = 0  # per GPU, as NVIDIA GPU feature discovery labels it (nvidia.com/gpu.memory)
    max_pods: int = 110  # EKS: eni-max-pods.txt; GKE: 110
    disk_gib: int = 100
    labels: dict = field(default_factory=dict)

    def allocatable(self) -> tuple[float, float, float]:
        """(CPU, memory GiB, ephemeral GiB) a pod may request, after the system, daemonsets and the image."""
        c = self.vcpu
        cpu = c - (0.06 + 0.01 * min(max(c - 1, 0), 1) + 0.005 * min(max(c - 2, 0), 2) + 0.0025 * max(c - 4, 0))
        m = self.mem_gib
        if self.cloud == "gke":
            reserved = 0.25 * min(m, 4) + 0.2 * min(max(m - 4, 0), 4) + 0.1 * min(max(m - 8, 0), 8) \
                + 0.06 * min(max(m - 16, 0), 112)
            disk = GKE_100GB_EPHEMERAL_GIB * self.disk_gib / 100
        else:
            reserved = (255 + 11 * self.max_pods) / 1024
            disk = self.disk_gib * 0.9 - 1
        ds_cpu, ds_mem = DAEMONSETS[self.gpus > 0]
        return cpu - ds_cpu, m - reserved - 100 / 1024 - ds_mem, disk - IMAGE_GIB


def _gpu_labels(cloud: str, gpus: int, gpu: str, gpu_mib: int, ec2_mib: int = 0, gke: str = "") -> dict:
    labels = {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": str(gpus),
              "nvidia.com/gpu.memory": str(gpu_mib), "nvidia.com/gpu.product": gpu}
    if cloud == "gke":
        labels["cloud.google.com/gke-accelerator"] = gke
    else:
        labels.update({"karpenter.k8s.aws/instance-gpu-count": str(gpus),
                       "karpenter.k8s.aws/instance-gpu-memory": str(ec2_mib),
                       "karpenter.k8s.aws/instance-gpu-name": gpu.split("-")[-1].lower()})
    return labels


SHAPES = {s.name: s for s in [
    Shape("e2-standard-4", "gke", 4, 16),
    Shape("c2d-highcpu-8", "gke", 8, 16),
    Shape("g2-standard-16", "gke", 16, 64, 1, "NVIDIA-L4", 23034,
          labels=_gpu_labels("gke", 1, "NVIDIA-L4", 23034, gke="nvidia-l4")),
    Shape("g2-standard-24", "gke", 24, 96, 2, "NVIDIA-L4", 23034,
          labels=_gpu_labels("gke", 2, "NVIDIA-L4", 23034, gke="nvidia-l4")),
    Shape("n1-standard-16+t4", "gke", 16, 60, 1, "Tesla-T4", 15360,
          labels=_gpu_labels("gke", 1, "Tesla-T4", 15360, gke="nvidia-tesla-t4")),
    Shape("m6i.xlarge", "eks", 4, 16, max_pods=58),
    Shape("c6i.2xlarge", "eks", 8, 16, max_pods=58),
    Shape("g6.4xlarge", "eks", 16, 64, 1, "NVIDIA-L4", 23034, max_pods=234,
          labels=_gpu_labels("eks", 1, "NVIDIA-L4", 23034, ec2_mib=22888)),
    Shape("g5.4xlarge", "eks", 16, 64, 1, "NVIDIA-A10G", 23028, max_pods=234,
          labels=_gpu_labels("eks", 1, "NVIDIA-A10G", 23028, ec2_mib=24576)),
    Shape("g4dn.4xlarge", "eks", 16, 64, 1, "Tesla-T4", 15360, max_pods=29,
          labels=_gpu_labels("eks", 1, "Tesla-T4", 15360, ec2_mib=16384)),
]}

EKS = {"head": "m6i.xlarge", "face": "c6i.2xlarge", "generator": ["g6.4xlarge", "g5.4xlarge"]}
GKE = {"head": "e2-standard-4", "face": "c2d-highcpu-8", "generator": ["g2-standard-16"]}

# value set -> the nodes it is meant for ({group: shape or shapes}, plus labels the set's own selectors expect).
TARGETS = {
    "default": [EKS, GKE],
    "minimal": [EKS],
    "trial": [EKS],
    "ha": [{**EKS, "extra_labels": {"head": {"karpenter.sh/capacity-type": "on-demand"}}}],
    "s3": [EKS],
    "no-monitoring": [EKS],
    "full": [{"head": "e2-standard-4", "face": "c2d-highcpu-8", "generator": ["g2-standard-24"],
              "extra_labels": {"head": {"pool": "system"}, "face": {"pool": "cpu"}}}],
    "scale-to-zero": [GKE],
}
# Shapes a default config must never be placed on (too little GPU memory for app.max_models_per_replica 2).
TOO_SMALL_FOR_DEFAULT = ["g4dn.4xlarge", "n1-standard-16+t4"]
