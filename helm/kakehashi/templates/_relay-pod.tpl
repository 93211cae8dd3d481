{{/*
The relay pod template, shared by the DaemonSet (hostNetwork mode) and the StatefulSet
(loadBalancer mode). The admin and metrics listeners bind the pod IP: the relay publishes
`http://<admin bind address>` in etcd for coordinators, so it must be routable.
*/}}
{{- define "kakehashi.relay.podTemplate" -}}
{{- $r := .Values.relay }}
{{- $labels := dict "ctx" $ "component" "relay" }}
{{- $hostNet := eq $r.mode "hostNetwork" }}
metadata:
  labels:
    {{- include "kakehashi.labels" $labels | nindent 4 }}
  {{- with $r.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "kakehashi.serviceAccountName" . }}
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $hostNet }}
  hostNetwork: true
  # Resolve cluster Services (etcd) from the host network.
  dnsPolicy: ClusterFirstWithHostNet
  {{- end }}
  # SIGTERM drains for drainGraceSeconds; the slack covers closing sockets after it.
  terminationGracePeriodSeconds: {{ add $r.drainGraceSeconds $r.drainSlackSeconds }}
  securityContext:
    {{- include "kakehashi.podSecurityContext" . | nindent 4 }}
  {{- if and $hostNet $r.hostNetwork.setSysctls }}
  initContainers:
    - name: sysctl
      image: {{ $r.hostNetwork.sysctlImage }}
      command:
        - sysctl
        - -w
        - net.core.rmem_max={{ int64 $r.socketBufferBytes }}
        - net.core.wmem_max={{ int64 $r.socketBufferBytes }}
      securityContext:
        privileged: true
        runAsNonRoot: false
        runAsUser: 0
  {{- end }}
  containers:
    - name: relay
      image: {{ include "kakehashi.image" (dict "ctx" $ "image" $r.image) }}
      imagePullPolicy: {{ $r.image.pullPolicy }}
      securityContext:
        {{- include "kakehashi.containerSecurityContext" . | nindent 8 }}
      ports:
        - name: quic
          containerPort: {{ $r.quicPort }}
          {{- if $hostNet }}
          hostPort: {{ $r.quicPort }}
          {{- end }}
          protocol: UDP
        - name: admin
          containerPort: {{ $r.adminPort }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $r.metricsPort }}
          protocol: TCP
      env:
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: HOST_IP
          valueFrom:
            fieldRef:
              fieldPath: status.hostIP
        - name: NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: spec.nodeName
        - name: RUST_LOG
          value: {{ $r.logLevel | quote }}
        - name: KAKEHASHI_RELAY_ID
          value: "$(POD_NAME)"
        - name: KAKEHASHI_RELAY_LISTEN
          value: "0.0.0.0:{{ $r.quicPort }}"
        - name: KAKEHASHI_RELAY_ADMIN_LISTEN
          value: "$(POD_IP):{{ $r.adminPort }}"
        - name: KAKEHASHI_RELAY_METRICS_LISTEN
          value: "$(POD_IP):{{ $r.metricsPort }}"
        - name: KAKEHASHI_RELAY_ADVERTISE
          {{- if $hostNet }}
          value: "{{ $r.hostNetwork.advertiseHost }}:{{ $r.quicPort }}"
          {{- else }}
          value: "$(POD_NAME).{{ required "relay.loadBalancer.advertiseDomain is required in loadBalancer mode: each pod advertises <pod>.<domain>" $r.loadBalancer.advertiseDomain }}:{{ $r.loadBalancer.publicPort }}"
          {{- end }}
        - name: KAKEHASHI_RELAY_SERVER_NAME
          value: {{ $r.serverName | quote }}
        - name: KAKEHASHI_COORDINATOR_KEY
          value: {{ required "signingKey.publicKeyHex is required: relays verify tokens with it" .Values.signingKey.publicKeyHex | quote }}
        - name: KAKEHASHI_ETCD_ENDPOINTS
          value: {{ include "kakehashi.etcdEndpoints" . | quote }}
        - name: KAKEHASHI_ETCD_NAMESPACE
          value: {{ .Values.etcd.namespace | quote }}
        - name: KAKEHASHI_RELAY_REGION
          value: {{ $r.region | quote }}
        - name: KAKEHASHI_RELAY_MAX_SESSIONS
          value: {{ $r.maxSessions | quote }}
        - name: KAKEHASHI_RELAY_MAX_PARTICIPANTS
          value: {{ $r.maxParticipants | quote }}
        - name: KAKEHASHI_RELAY_SOCKET_BUFFER
          value: {{ int64 $r.socketBufferBytes | quote }}
        - name: KAKEHASHI_RELAY_LEASE_TTL_SECS
          value: {{ $r.leaseTTLSeconds | quote }}
        - name: KAKEHASHI_RELAY_DRAIN_GRACE_SECS
          value: {{ $r.drainGraceSeconds | quote }}
        {{- if $r.tls.existingSecret }}
        - name: KAKEHASHI_RELAY_TLS_CERT
          value: /etc/kakehashi/tls/tls.crt
        - name: KAKEHASHI_RELAY_TLS_KEY
          value: /etc/kakehashi/tls/tls.key
        {{- end }}
        {{- include "kakehashi.otelEnv" (dict "ctx" $ "service" "kakehashi-relay") | nindent 8 }}
        {{- with $r.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      # /readyz answers 200 once the relay has registered in etcd and until it starts
      # draining (SIGTERM), so a draining relay leaves its Service at once; /livez fails
      # only if the relay's node supervisor has stopped. Both live on the metrics port.
      readinessProbe:
        httpGet:
          path: /readyz
          port: metrics
        periodSeconds: 2
        failureThreshold: 1
      livenessProbe:
        httpGet:
          path: /livez
          port: metrics
        periodSeconds: 10
        failureThreshold: 6
      {{- if $r.tls.existingSecret }}
      volumeMounts:
        - name: tls
          mountPath: /etc/kakehashi/tls
          readOnly: true
      {{- end }}
      {{- with $r.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
  {{- if $r.tls.existingSecret }}
  volumes:
    - name: tls
      secret:
        secretName: {{ $r.tls.existingSecret }}
        defaultMode: 0440
  {{- end }}
  {{- with $r.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $r.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $r.affinity }}
  affinity:
    {{- toYaml $r.affinity | nindent 4 }}
  {{- else if not $hostNet }}
  # One relay per node: a node's loss costs one relay's sessions, and relays do not share
  # a NIC.
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "kakehashi.selectorLabels" $labels | nindent 16 }}
  {{- end }}
{{- end }}
